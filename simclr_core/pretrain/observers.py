"""What the pretraining loop shows while it runs: DVCLive metrics, the progress bar, the epoch
lines of the log, and Prometheus metrics, each an :class:`Observer`.

Observers see the loop and change nothing it computes. The trainer calls every one of them,
in its list's order, after each step (on an accelerator, a few steps late: it reads the
losses of several steps at once, see :func:`~simclr_core.pretrain.trainer.finite_check_every`,
but always before the next checkpoint), after each checkpoint save (rank 0, which writes them),
at each epoch's end (after that epoch's checkpoint is saved, so what an observer shows is in a
checkpoint), and once at the end.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from simclr_core.config import ConfigError
from simclr_core.monitoring import TrainingMonitor

__all__ = [
    "LIVE_DIR", "StepDone", "Observer", "DvcLiveMetrics", "ProgressBar", "EpochLog", "PrometheusMetrics",
    "progress_bar", "describe_epoch",
]

LIVE_DIR = "live"  # DVCLive's folder in the run directory (dvc.yaml's metrics and plots)


@dataclasses.dataclass(frozen=True)
class StepDone:
    """One optimizer step of this rank, as the observers see it."""

    step: int  # steps done, this one included
    epoch: int  # the step's epoch, counting from 1
    loss: float  # NT-Xent loss of this rank's rows
    lr: float  # learning rate for the next step
    images: int  # images this rank trained on (two views each)
    seconds: float  # the whole step, data wait included (on an accelerator: the mean of the steps read together)
    data_wait: float  # seconds the loop waited for the step's views


class Observer:
    """Sees the loop, changes nothing it computes; every method does nothing unless overridden."""

    def on_step(self, done: StepDone) -> None:
        """A step is done."""

    def on_checkpoint(self, seconds: float | None) -> None:
        """Rank 0 saved a checkpoint in ``seconds``, or (None) the save raised and the run stops."""

    def on_epoch_end(self, results: dict[str, float]) -> None:
        """An epoch ended and its checkpoint is saved; ``results`` are its metrics (this rank's)."""

    def close(self) -> None:
        """The loop ended, or stopped on an error."""


class DvcLiveMetrics(Observer):
    """DVCLive on rank 0: one point per epoch (loss, lr, images/s, kNN accuracy) under ``live/``.

    ``history`` holds the epochs already done (a resumed run's, from its checkpoint): they are
    written again first, so ``live/`` is whole even where it was deleted since (``dvc repro``
    removes a stage's outputs before it reruns the stage) or never reached this machine.
    """

    def __init__(self, out_dir: Path, history: list[dict[str, float]], enabled: bool) -> None:
        self.live = None
        if enabled:
            from dvclive import Live

            try:
                self.live = Live(dir=str(out_dir / LIVE_DIR), resume=False, save_dvc_exp=False, dvcyaml=None)
            except Exception as error:  # dvclive 3.x fails inside a git repository without commits
                if "Empty git repo" in str(error):
                    raise ConfigError("the git repository around this DVC project has no commit yet; commit once, then rerun") from None
                raise
            for values in history:
                self.on_epoch_end(values)

    def on_epoch_end(self, results: dict[str, float]) -> None:
        if self.live is None:
            return
        for name, value in results.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def progress_bar(total_steps: int, initial_step: int, batch_size: int, enabled: bool = True, desc: str | None = None):
    """A bar counted in steps and shown in images (so its rate is images/s), with the ETA.

    On a terminal it redraws twice a second; in a log (DVC, a pod) it writes a line every 10 s.
    """
    from tqdm import tqdm

    return tqdm(
        total=total_steps, initial=initial_step, disable=not enabled, unit="img", unit_scale=batch_size, desc=desc,
        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr,
    )


class ProgressBar(Observer):
    """The run's :func:`progress_bar` on stderr (rank 0), with the epoch, loss and lr of the last step."""

    def __init__(self, total_steps: int, first_step: int, batch_size: int, epochs: int, enabled: bool) -> None:
        self.bar = progress_bar(total_steps, first_step, batch_size, enabled)
        self.epochs = epochs

    def on_step(self, done: StepDone) -> None:
        self.bar.update(1)
        self.bar.set_postfix(epoch=f"{done.epoch}/{self.epochs}", loss=f"{done.loss:.4f}", lr=f"{done.lr:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def describe_epoch(results: dict[str, float], epochs: int) -> str:
    """One line for a reader: the epoch's loss, lr, images/s and (when measured) kNN accuracy."""
    text = (
        f"epoch {results['epoch']}/{epochs}: loss {results['loss']:.4f}, lr {results['lr']:.4g}, "
        f"{results['images_per_second']:.0f} images/s"
    )
    if "knn_accuracy" in results:
        text += f", kNN accuracy {100 * results['knn_accuracy']:.2f}%"
    return text


class EpochLog(Observer):
    """Each epoch's :func:`describe_epoch` line on stdout, on every rank (its own figures),
    written through tqdm so that it lands above the bar instead of through it."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, results: dict[str, float]) -> None:
        from tqdm import tqdm

        tqdm.write(describe_epoch(results, self.epochs))


class PrometheusMetrics(Observer):
    """This rank's :class:`TrainingMonitor`: an endpoint and/or Pushgateway pushes, when configured.

    Raises:
        ConfigError: the endpoint's port is in use or cannot be bound.
    """

    def __init__(self, rank: int, local_rank: int, port: int, pushgateway: str) -> None:
        self.monitor = TrainingMonitor(rank, local_rank, port, pushgateway)

    def on_step(self, done: StepDone) -> None:
        self.monitor.on_step(done.step, done.epoch, done.loss, done.lr, done.images, done.seconds, done.data_wait)

    def on_checkpoint(self, seconds: float | None) -> None:
        if seconds is None:
            self.monitor.checkpoint_failed()
        else:
            self.monitor.checkpoint_saved(seconds)

    def on_epoch_end(self, results: dict[str, float]) -> None:
        self.monitor.on_epoch(results)  # pushes: what the Pushgateway shows is in a checkpoint

    def close(self) -> None:
        self.monitor.close()
