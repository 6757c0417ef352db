"""Preemption: a run killed with SIGKILL anywhere and restarted ends bit-identical to an uninterrupted one.

Each faulted run is a real process that kills itself with SIGKILL (tests/faults.py patches the
kill point in; the trainer has no test hooks). The restart is the same command, as a
PyTorchJob pod restarted with restartPolicy OnFailure would run it.
"""

from __future__ import annotations

import signal
import sys
import subprocess
from pathlib import Path

import pytest
import torch

from simclr_core.checkpoint import CheckpointManager, load_checkpoint
from simclr_core.storage import LocalStore
from tests.conftest import TINY_PRETRAIN, cli_argv, cli_cwd, cli_env, run_cli
from tests.multiproc import free_port

# 54 training images, batch 16: 3 steps per epoch, 9 steps in all; checkpoints after steps
# 2, 3, 4, 6, 8, 9 (every 2 steps and at each epoch end).
SETTINGS = [*TINY_PRETRAIN, "--epochs", "3", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
TOTAL_STEPS = 9


def _cli_args(data: Path, out: Path) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--device", "cpu", *SETTINGS]


def _run(data: Path, out: Path, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    return run_cli(*_cli_args(data, out), fault=fault)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "model.pt")
    assert state["step"] == TOTAL_STEPS
    return state["model"]


def _assert_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{what}: {len(different)} tensors differ, first {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _run(tiny_prepared, out)
    assert result.returncode == 0, result.stderr
    return _weights(out)


# Every kill point on every run (an audit found that a random choice among the unsaved steps
# left resume untested in about a third of the runs).
KILL_POINTS = {
    "before-the-first-checkpoint": ("kill-before-step", 1),
    "mid-epoch-2": ("kill-before-step", 5),
    "mid-epoch-3": ("kill-before-step", 7),
    "right-after-checkpoint": ("kill-after-checkpoint", 4),
    "during-checkpoint-write": ("kill-during-checkpoint", 6),
    "before-latest-pointer": ("kill-before-pointer", 8),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_restart_is_bit_identical(tiny_prepared, tmp_path, uninterrupted, point):
    fault = KILL_POINTS[point]
    run = tmp_path / "run"
    killed = _run(tiny_prepared, run, fault)
    assert killed.returncode == -signal.SIGKILL, f"{fault}: expected a SIGKILL, got {killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (run / "model.pt").exists()
    latest = CheckpointManager(LocalStore(run)).load_latest()  # None when killed before the first save
    assert (latest is None) == (point == "before-the-first-checkpoint"), f"{fault}: latest checkpoint {latest and latest[1]}"

    restarted = _run(tiny_prepared, run)
    assert restarted.returncode == 0, restarted.stderr
    if latest is None:
        assert "resuming" not in restarted.stderr
    else:
        assert latest[1]["step"] < TOTAL_STEPS
        assert f"at step {latest[1]['step']} of {TOTAL_STEPS}" in restarted.stderr
    _assert_identical(uninterrupted, _weights(run), f"killed at {fault}")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_prepared, tmp_path, uninterrupted):
    run = tmp_path / "run"
    killed = _run(tiny_prepared, run, ("kill-after-checkpoint", 6))
    assert killed.returncode == -signal.SIGKILL
    manager = CheckpointManager(LocalStore(run))
    newest, previous = manager.list()[:2]
    with open(run / newest["file"], "r+b") as stream:  # flip bytes in the middle: same size, wrong sha256
        stream.seek(newest["bytes"] // 2)
        stream.write(b"\xff" * 64)

    restarted = _run(tiny_prepared, run)
    assert restarted.returncode == 0, restarted.stderr
    assert "does not match its metadata" in restarted.stderr
    assert f"at step {previous['step']} of {TOTAL_STEPS}" in restarted.stderr
    _assert_identical(uninterrupted, _weights(run), "after a corrupt checkpoint")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    result = _run(tiny_prepared, run, ("nan-at-step", 5))
    assert result.returncode == 1, result.stderr
    assert "loss is nan at step 5" in result.stderr
    assert "Traceback" not in result.stderr
    latest = CheckpointManager(LocalStore(run)).load_latest()
    assert latest[1]["step"] == 4
    assert all(torch.isfinite(t).all() for t in latest[0]["model"].values() if t.is_floating_point())
    assert str(run / "checkpoints" / "step-00000004.pt") in result.stderr


def _launch_job(data: Path, out: Path, fault: tuple[str, int] | None, port: int) -> list[subprocess.Popen]:
    """Two gloo processes with the environment the Training Operator gives a PyTorchJob's pods."""
    processes = []
    for rank in range(2):
        env = cli_env(dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0", FAULT_RANK="1"))
        processes.append(subprocess.Popen(
            cli_argv(*_cli_args(data, out), fault=fault), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            cwd=cli_cwd(),
        ))
    return processes


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process once it ends."""
    errors = [p.communicate(timeout=300)[1] for p in processes]
    return [(p.returncode, stderr) for p, stderr in zip(processes, errors)]


@pytest.mark.multiproc
def test_two_processes_one_killed_job_restarted_is_bit_identical(tiny_prepared, tmp_path):
    reference = tmp_path / "reference"
    outcomes = _finish(_launch_job(tiny_prepared, reference, None, free_port()))
    assert all(code == 0 for code, _ in outcomes), outcomes

    run = tmp_path / "run"
    step = 5  # after the checkpoint of step 4: the restart resumes and must redo step 5
    rank0, rank1 = _launch_job(tiny_prepared, run, ("kill-before-step", step), free_port())
    (code, stderr), = _finish([rank1])
    assert code == -signal.SIGKILL, stderr
    try:  # the survivor fails on its next collective, or is stopped with the job
        rank0.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        rank0.kill()
        rank0.communicate()
    assert not (run / "model.pt").exists()

    outcomes = _finish(_launch_job(tiny_prepared, run, None, free_port()))
    assert all(code == 0 for code, _ in outcomes), outcomes
    assert "resuming from" in outcomes[0][1]
    _assert_identical(_weights(reference), _weights(run), f"rank 1 killed after step {step}")


@pytest.mark.multiproc
def test_torchrun_restarts_the_group_when_one_process_dies_and_the_run_ends_identical(tiny_prepared, tmp_path):
    """What a pod's torchrun does with ``--max-restarts`` (the launcher and the manifests pass
    it): rank 1 of 2 is SIGKILLed after step 5 in the first attempt; torchrun stops the
    survivor, restarts both, they resume from the step-4 checkpoint, and the final weights are
    bit-identical to an uninterrupted 2-process run's (fp32)."""

    def torchrun(out: Path, fault: list[str], env: dict) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                   "-m", *fault, *_cli_args(tiny_prepared, out)]
        return subprocess.run(command, env=cli_env(env), capture_output=True, text=True, timeout=600, cwd=cli_cwd())

    reference = torchrun(tmp_path / "reference", ["simclr_core"], {})
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    result = torchrun(run, ["tests.faults", "kill-before-step", "5", "--"], {"FAULT_RANK": "1", "FAULT_ATTEMPT": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Signals.SIGKILL" in result.stderr or "exitcode: -9" in result.stderr, result.stderr[-3000:]  # the kill happened
    assert f"at step 4 of {TOTAL_STEPS}" in result.stderr  # ... and the restarted group resumed
    _assert_identical(_weights(tmp_path / "reference"), _weights(run), "rank 1 killed after step 5, restarted by torchrun")
