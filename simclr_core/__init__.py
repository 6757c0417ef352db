"""simclr_core: SimCLR (Chen et al., 2020) exactly, on one process or many.

The library knows nothing about Kubeflow or Kubernetes. Modules:

- :mod:`simclr_core.augment`: the paper's augmentation policy, per sample and batched.
- :mod:`simclr_core.models`: ResNet encoders (CIFAR stem for small images) and the projection head.
- :mod:`simclr_core.loss`: NT-Xent with a gradient-preserving gather across ranks.
- :mod:`simclr_core.optim`: LARS, its parameter groups, LR scaling and warmup + cosine.
- :mod:`simclr_core.distributed`: torch.distributed from the environment, global BatchNorm.
"""

__version__ = "0.1.0"
