"""SimCLR pretraining: one explicit loop for one process, torchrun, or a multi-node PyTorchJob.

The run is a pure function of the settings and the step number, whatever the world size
(:class:`~simclr_core.pretrain.trainer.Trainer` says how), so a run on W processes computes the
same losses as one process on the global batch, and a resumed run continues exactly where it
stopped.

- :mod:`~simclr_core.pretrain.trainer`: :func:`pretrain` and the loop, as a :class:`Trainer` with named steps.
- :mod:`~simclr_core.pretrain.plan`: the sizes of the run and the images of every step on every rank.
- :mod:`~simclr_core.pretrain.model_setup`: the model, its optimizer and schedule, the augmentation policy, the precision.
- :mod:`~simclr_core.pretrain.prefetch`: the next step's views, made in a background thread.
- :mod:`~simclr_core.pretrain.knn_probe`: the epoch-end kNN accuracy on the val split.
- :mod:`~simclr_core.pretrain.observers`: DVCLive metrics, the progress bar, the epoch lines, Prometheus.
"""

from simclr_core.pretrain.model_setup import build_model, model_config_for
from simclr_core.pretrain.plan import check_world_size
from simclr_core.pretrain.trainer import MODEL_NAME, Trainer, TrainingError, pretrain

__all__ = ["pretrain", "Trainer", "TrainingError", "MODEL_NAME", "check_world_size", "model_config_for", "build_model"]
