"""The pretraining loop calls its observers in order: each step, each checkpoint save (rank 0),
each epoch's end after that epoch's checkpoint, and close once at the end."""

from __future__ import annotations

from simclr_core.method.distributed import DistEnv
from simclr_core.pretrain import observers, pretrain
from simclr_core.pretrain.trainer import Trainer
from tests.test_pretrain_resume import _tiny_config


class Recorder(observers.Observer):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step(self, done: observers.StepDone) -> None:
        self.calls.append(("step", done.step, done.epoch, done.images))

    def on_checkpoint(self, seconds: float | None) -> None:
        self.calls.append(("checkpoint", seconds is not None and seconds >= 0))

    def on_epoch_end(self, results: dict[str, float]) -> None:
        self.calls.append(("epoch", results["epoch"]))

    def close(self) -> None:
        self.calls.append(("close",))


def test_observers_see_steps_checkpoints_epoch_ends_and_close_in_order(tiny_prepared, tmp_path, monkeypatch):
    recorder = Recorder()
    make = Trainer._make_observers
    monkeypatch.setattr(Trainer, "_make_observers", lambda self: [*make(self), recorder])
    pretrain(_tiny_config(checkpoint_every=2), tiny_prepared, tmp_path / "run", DistEnv())
    epoch = [("step", 1, 1, 16), ("step", 2, 1, 16), ("checkpoint", True), ("step", 3, 1, 16), ("checkpoint", True), ("epoch", 1)]
    second = [("step", 4, 2, 16), ("checkpoint", True), ("step", 5, 2, 16), ("step", 6, 2, 16), ("checkpoint", True), ("epoch", 2)]
    assert recorder.calls == epoch + second + [("close",)]


def test_describe_epoch_names_the_figures():
    results = {"epoch": 2, "loss": 3.21234, "lr": 0.0125, "images_per_second": 301.6, "knn_accuracy": 0.4567}
    assert observers.describe_epoch(results, 5) == "epoch 2/5: loss 3.2123, lr 0.0125, 302 images/s, kNN accuracy 45.67%"
    del results["knn_accuracy"]
    assert observers.describe_epoch(results, 5) == "epoch 2/5: loss 3.2123, lr 0.0125, 302 images/s"
