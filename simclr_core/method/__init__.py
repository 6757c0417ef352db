"""The paper's parts, and nothing else: no files, no network, no settings file.

- :mod:`~simclr_core.method.augment`: the augmentation policy, per sample and batched.
- :mod:`~simclr_core.method.models`: ResNet encoders (CIFAR stem for small images) and the projection head.
- :mod:`~simclr_core.method.loss`: NT-Xent with a gradient-preserving gather across ranks.
- :mod:`~simclr_core.method.optim`: LARS, its parameter groups, LR scaling and warmup + cosine.
- :mod:`~simclr_core.method.distributed`: where a process sits, the gathers, global BatchNorm.

Nothing here imports from the rest of :mod:`simclr_core` (tests/test_layout.py checks), so
the stages above can use every part and a notebook can use any part alone.
"""
