"""simclr_core: SimCLR (Chen et al., 2020) exactly, on one process or many.

The library knows nothing about Kubeflow or Kubernetes. Its layers, each importing only the
ones below it (tests/test_layout.py checks):

- :mod:`simclr_core.method`: the paper's parts, no I/O: augmentations, ResNet encoders and the
  projection head, NT-Xent, LARS and its schedule, global BatchNorm and the gathers.
- :mod:`simclr_core.launch`: torch.distributed from the launch environment (torchrun, a PyTorchJob).
- data, checkpoints, storage, metrics: the stages' inputs and outputs.
- the stages: pretraining (:mod:`simclr_core.pretrain`), evaluations, the report.
- :mod:`simclr_core.cli`: the ``simclr`` command.
"""

__version__ = "0.1.0"
