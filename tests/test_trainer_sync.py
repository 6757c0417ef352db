"""The trainer reads its losses every few steps on an accelerator (no host wait each step), and
that changes nothing: the same weights, checkpoints, losses and observer calls, and a non-finite
loss still stops the run naming its step before any checkpoint holds it.

The GPU's interval is forced onto the CPU here (``finite_check_every``): what it changes is the
order of the host's work, which a CPU run shows as well."""

from __future__ import annotations

import pytest
import torch

from simclr_core.checkpoint import CheckpointManager, load_checkpoint
from simclr_core.method.distributed import DistEnv
from simclr_core.method.loss import NTXentLoss
from simclr_core.pretrain import TrainingError, pretrain, trainer
from simclr_core.pretrain.observers import Observer, StepDone
from simclr_core.storage import LocalStore
from tests.test_pretrain_resume import _loss_rows, _tiny_config

EVERY = 4  # with 3 steps an epoch: checks at 3 (epoch end), 4 (the interval) and 6 (epoch end, last step)


class StepLog(Observer):
    """Every call the loop makes, with what each step shows."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step(self, done: StepDone) -> None:
        self.calls.append(("step", done.step, done.epoch, done.loss, done.lr, done.images))

    def on_checkpoint(self, seconds: float | None) -> None:
        self.calls.append(("checkpoint",))

    def on_epoch_end(self, results: dict[str, float]) -> None:
        self.calls.append(("epoch", results["epoch"], results["loss"]))


def _run(data, out, monkeypatch, every: int | None) -> tuple[StepLog, list[int]]:
    """pretrain with the loss read every ``every`` steps (None: the CPU's own interval); the
    observer's calls and the steps at which the losses were read."""
    log, checks = StepLog(), []
    if every is not None:
        monkeypatch.setattr(trainer, "finite_check_every", lambda device: every)
    make, check = trainer.Trainer._make_observers, trainer.Trainer._check_and_observe

    def counted_check(self, observers):
        checks.append(self.step)
        return check(self, observers)

    monkeypatch.setattr(trainer.Trainer, "_make_observers", lambda self: [*make(self), log])
    monkeypatch.setattr(trainer.Trainer, "_check_and_observe", counted_check)
    try:
        pretrain(_tiny_config(checkpoint_every=0, keep_checkpoints=10), data, out, DistEnv())
    finally:
        monkeypatch.undo()
    return log, checks


def _computed(epoch: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics without its timings (images/s, data wait), which no two runs share."""
    return {key: value for key, value in epoch.items() if key not in ("images_per_second", "data_wait_fraction")}


def _nan_at(monkeypatch, at_step: int) -> None:
    """The loss of step ``at_step`` (1-based) becomes NaN, as tests/faults.py's nan-at-step."""
    original, calls = NTXentLoss.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == at_step else loss

    monkeypatch.setattr(NTXentLoss, "forward", forward)


def test_the_cpu_reads_every_step_and_an_accelerator_every_few():
    assert trainer.finite_check_every(torch.device("cpu")) == 1
    assert trainer.finite_check_every(torch.device("cuda", 0)) == trainer.ACCELERATOR_CHECK_STEPS > 1


def test_reading_the_losses_every_few_steps_changes_nothing_the_run_computes(tiny_prepared, tmp_path, monkeypatch):
    each, each_checks = _run(tiny_prepared, tmp_path / "each", monkeypatch, None)
    few, few_checks = _run(tiny_prepared, tmp_path / "few", monkeypatch, EVERY)
    assert each_checks == [1, 2, 3, 4, 5, 6]
    assert few_checks == [3, 4, 6]  # at epoch ends (before their checkpoints), the interval, the last step
    assert few.calls == each.calls  # the same steps, losses, lr, checkpoints and epochs, in the same order
    assert [call[0] for call in few.calls].count("step") == 6
    assert _loss_rows(tmp_path / "few") == _loss_rows(tmp_path / "each")
    for name in ("model.pt", "checkpoints/step-00000003.pt", "checkpoints/step-00000006.pt"):
        a, b = load_checkpoint(tmp_path / "each" / name), load_checkpoint(tmp_path / "few" / name)
        assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"]), name
        if "optimizer" in a:
            for key, state in a["optimizer"]["state"].items():
                assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), name
            assert a["unfinished_epoch"] == b["unfinished_epoch"]
            assert [_computed(epoch) for epoch in a["epoch_metrics"]] == [_computed(epoch) for epoch in b["epoch_metrics"]]


@pytest.mark.parametrize(("nan_step", "saved"), [(2, None), (4, 3), (5, 3)])
def test_a_nan_between_checks_stops_at_the_next_check_naming_its_step(tiny_prepared, tmp_path, monkeypatch, nan_step, saved):
    """Read every 4 steps, 3 steps an epoch: a NaN at step 2 is seen at step 3's check, before the
    epoch's checkpoint; one at step 4 at step 4's; one at step 5 at step 6's. The run stops naming
    the NaN's step; the newest checkpoint is the last one before it, and finite."""
    _nan_at(monkeypatch, nan_step)
    log = StepLog()
    monkeypatch.setattr(trainer, "finite_check_every", lambda device: EVERY)
    make = trainer.Trainer._make_observers
    monkeypatch.setattr(trainer.Trainer, "_make_observers", lambda self: [*make(self), log])
    with pytest.raises(TrainingError, match=f"loss is nan at step {nan_step}; stopped without saving it"):
        pretrain(_tiny_config(checkpoint_every=0), tiny_prepared, tmp_path / "run", DistEnv())
    latest = CheckpointManager(LocalStore(tmp_path / "run")).load_latest()
    assert (latest[1]["step"] if latest else None) == saved
    if latest:
        assert all(torch.isfinite(t).all() for t in latest[0]["model"].values() if t.is_floating_point())
    shown = [call[1] for call in log.calls if call[0] == "step"]
    assert shown == list(range(1, nan_step))  # the observers saw every step before the NaN, none from it on
