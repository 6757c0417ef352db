"""Pretraining resumes exactly, and gives the same losses on 1 and 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from simclr_core.checkpoint import CheckpointManager, load_checkpoint
from simclr_core.config import ConfigError, PretrainConfig
from simclr_core.method.distributed import DistEnv
from simclr_core.method.optim import LARS
from simclr_core.pretrain import model_setup, pretrain
from simclr_core.storage import LocalStore
from tests.conftest import DIST_VARS, TINY_PRETRAIN, cli_cwd, run_cli
from tests.multiproc import free_port


def _tiny_config(**overrides) -> PretrainConfig:
    settings = dict(
        width_multiplier=0.125, cifar_stem="false", batch_size=16, epochs=2, warmup_epochs=0.5,
        knn_k=5, knn_bank_size=0, checkpoint_every=1, num_threads=1, precision="fp32",
    )
    settings.update(overrides)
    return PretrainConfig(**settings)


def _latest(run_dir) -> dict:
    """The metadata of the run's latest checkpoint."""
    return CheckpointManager(LocalStore(run_dir)).load_latest()[1]


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("stop_after", [2, 3], ids=["mid-epoch", "at-epoch-end"])
def test_interrupted_run_resumes_at_its_step_and_matches_an_uninterrupted_one(tiny_prepared, tmp_path, monkeypatch, stop_after):
    config = _tiny_config()
    pretrain(config, tiny_prepared, tmp_path / "whole", DistEnv())
    whole = _weights(tmp_path / "whole" / "model.pt")

    original_step = LARS.step
    calls = {"n": 0}

    def step_then_interrupt(self, closure=None):
        if calls["n"] == stop_after:
            raise KeyboardInterrupt  # the process dies before this optimizer step
        calls["n"] += 1
        return original_step(self, closure)

    monkeypatch.setattr(LARS, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tiny_prepared, tmp_path / "resumed", DistEnv())
    assert _latest(tmp_path / "resumed")["step"] == stop_after
    assert not (tmp_path / "resumed" / "model.pt").exists()

    monkeypatch.setattr(LARS, "step", original_step)
    shutil.rmtree(tmp_path / "resumed" / "live", ignore_errors=True)  # as `dvc repro` does before it reruns the stage
    pretrain(config, tiny_prepared, tmp_path / "resumed", DistEnv())
    resumed = _weights(tmp_path / "resumed" / "model.pt")
    assert load_checkpoint(tmp_path / "resumed" / "model.pt")["step"] == 6
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
    assert _loss_rows(tmp_path / "resumed") == _loss_rows(tmp_path / "whole")  # both epochs, none twice


def _loss_rows(run_dir) -> list[tuple[str, str]]:
    """(step, loss) of each epoch in DVCLive's loss plot."""
    rows = (run_dir / "live" / "plots" / "metrics" / "loss.tsv").read_text().strip().splitlines()
    header = rows[0].split("\t")
    return [(r.split("\t")[header.index("step")], r.split("\t")[header.index("loss")]) for r in rows[1:]]


def test_rerun_of_a_finished_run_rebuilds_deleted_metrics_from_its_checkpoint(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    first = pretrain(_tiny_config(), tiny_prepared, run, DistEnv())
    metrics = (run / "live" / "metrics.json").read_text()
    rows = _loss_rows(run)
    assert len(rows) == 2
    shutil.rmtree(run / "live")
    (run / "model.pt").unlink()  # dvc repro --force deletes the outputs; the persisted checkpoints stay
    again = pretrain(_tiny_config(), tiny_prepared, run, DistEnv())
    assert _loss_rows(run) == rows
    assert json.loads((run / "live" / "metrics.json").read_text()) == json.loads(metrics)
    assert again["loss"] == first["loss"] and again["epoch"] == 2
    latest = CheckpointManager(LocalStore(run)).load_latest()[0]
    assert latest["step"] == 6 and len(latest["epoch_metrics"]) == 2
    rewritten = _weights(run / "model.pt")
    assert all(torch.equal(rewritten[name], tensor) for name, tensor in latest["model"].items())


def test_checkpoint_of_other_settings_is_not_resumed(tiny_prepared, tmp_path, caplog):
    pretrain(_tiny_config(epochs=1), tiny_prepared, tmp_path / "run", DistEnv())
    fresh = _tiny_config(epochs=1, temperature=0.2)
    with caplog.at_level("WARNING"):
        pretrain(fresh, tiny_prepared, tmp_path / "run", DistEnv())
    assert "other settings (temperature)" in caplog.text
    state, _ = CheckpointManager(LocalStore(tmp_path / "run")).load_latest()
    assert state["pretrain_config"]["temperature"] == 0.2


def _first_epoch_loss(run_dir) -> float:
    return json.loads((run_dir / "live" / "metrics.json").read_text())["loss"]


def _one_and_two_processes(data, tmp_path, settings: list[str]) -> None:
    """`simclr pretrain SETTINGS` in one process into tmp_path/one, and under torchrun with 2
    processes into tmp_path/two."""
    single = run_cli("pretrain", "--data", str(data), "--out", str(tmp_path / "one"), *settings)
    assert single.returncode == 0, single.stderr
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "simclr_core", "pretrain", "--data", str(data), "--out", str(tmp_path / "two"), "--device", "cpu", *settings],
        env=env, capture_output=True, text=True, timeout=600, cwd=cli_cwd(),  # tests/params.yaml, as run_cli
    )
    assert double.returncode == 0, double.stderr
    assert "2 process(es)" in double.stderr


@pytest.mark.multiproc
def test_torchrun_two_processes_give_the_single_process_first_step_loss(tiny_prepared, tmp_path):
    # 54 training images and a global batch of 48: the first epoch is exactly one step
    settings = [*TINY_PRETRAIN, "--epochs", "1", "--batch-size", "48"]
    _one_and_two_processes(tiny_prepared, tmp_path, settings)
    assert _first_epoch_loss(tmp_path / "two") == pytest.approx(_first_epoch_loss(tmp_path / "one"), rel=1e-5, abs=1e-5)
    one = _weights(tmp_path / "one" / "model.pt")
    two = _weights(tmp_path / "two" / "model.pt")
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.multiproc
def test_two_processes_equal_one_over_three_epochs_step_by_step(tiny_prepared, tmp_path):
    """Sharding, the per-epoch shuffle and every later step, not just the first: 3 epochs of 3
    steps (54 images, global batch 16), a checkpoint after every step; each step's weights and
    each epoch's loss of a 2-process run equal the single process's (fp32).

    At this width and TINY_PRETRAIN's LR, rounding noise alone (one thread against two, in one
    process) grows to 3e-2 by step 9, so no tolerance could tell a bug from noise; at base LR
    0.05 the same noise stays below 1e-5 while the weights still move by 0.1 to 1.9."""
    settings = [*TINY_PRETRAIN, "--epochs", "3", "--base-lr", "0.05", "--checkpoint-every", "1", "--keep-checkpoints", "100"]
    _one_and_two_processes(tiny_prepared, tmp_path, settings)
    for step in range(1, 10):
        name = f"checkpoints/step-{step:08d}.pt"
        one, two = _weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=5e-5, rtol=1e-4, msg=f"step {step}: {key}")
    first, last = _weights(tmp_path / "one" / "checkpoints/step-00000001.pt"), _weights(tmp_path / "one" / "model.pt")
    moved = max((last[key] - first[key]).abs().max().item() for key in first if "running" not in key and first[key].is_floating_point())
    assert moved > 0.05  # the tolerance is far below how far training moves the weights
    epochs_one = load_checkpoint(tmp_path / "one" / "checkpoints/step-00000009.pt")["epoch_metrics"]
    epochs_two = load_checkpoint(tmp_path / "two" / "checkpoints/step-00000009.pt")["epoch_metrics"]
    assert len(epochs_one) == len(epochs_two) == 3
    for first, second in zip(epochs_one, epochs_two):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-5, abs=1e-5)


def test_bf16_autocast_is_used_when_asked_and_stays_close_to_fp32(tiny_prepared, tmp_path, caplog):
    from simclr_core.pretrain import TrainingError

    settings = dict(epochs=1, width_multiplier=0.25, base_lr=0.05)
    with caplog.at_level("INFO", logger="simclr.pretrain"):
        try:
            pretrain(_tiny_config(precision="bf16", **settings), tiny_prepared, tmp_path / "bf16", DistEnv())
        except TrainingError as error:
            # On a CPU with native bf16 (AVX512-BF16/AMX), identical runs of this model reached
            # a NaN loss in about half of the tries (2026-11-30; not isolated, below our code):
            # why `auto` is fp32 on CPUs. Elsewhere a NaN here is a failure.
            if "loss is nan" in str(error) and model_setup._cpu_has_native_bf16():
                pytest.xfail(f"known: bf16 on this CPU's native kernels gave {error}"[:200])
            raise
    assert "bf16 autocast" in caplog.text
    pretrain(_tiny_config(precision="fp32", **settings), tiny_prepared, tmp_path / "fp32", DistEnv())
    bf16_loss, fp32_loss = _first_epoch_loss(tmp_path / "bf16"), _first_epoch_loss(tmp_path / "fp32")
    assert bf16_loss != fp32_loss  # the encoder really ran in bf16 ...
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)  # ... with bf16's 8-bit mantissa: close
    state = load_checkpoint(tmp_path / "bf16" / "model.pt")["model"]
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())  # weights stay float32


@pytest.mark.parametrize(
    ("precision", "device", "native", "expected"),
    [("bf16", "cpu", False, True), ("fp32", "cuda", True, False), ("auto", "cuda", False, True),
     ("auto", "cpu", True, False), ("auto", "cpu", False, False)],
)
def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpus(monkeypatch, precision, device, native, expected):
    monkeypatch.setattr(model_setup, "_cpu_has_native_bf16", lambda: native)
    assert model_setup.uses_bf16(precision, torch.device(device)) is expected


def test_batch_smaller_than_world_size_exits_2_before_rendezvous(tiny_prepared, tmp_path):
    result = run_cli(
        "pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), *TINY_PRETRAIN, "--batch-size", "3",
        env={"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, timeout=60,
    )
    assert result.returncode == 2
    assert "pretrain.batch_size=3 must be a multiple of the number of processes (4)" in result.stderr


def test_knn_pass_runs_every_knn_every_epochs_and_at_the_last(tiny_prepared, tmp_path, monkeypatch):
    from simclr_core.pretrain.knn_probe import KnnProbe

    passes = []
    real_accuracy = KnnProbe.accuracy
    monkeypatch.setattr(KnnProbe, "accuracy", lambda self, *a: passes.append(1) or real_accuracy(self, *a))
    run = tmp_path / "run"
    pretrain(_tiny_config(epochs=5, knn_every=2, checkpoint_every=0), tiny_prepared, run, DistEnv())
    epochs = load_checkpoint(run / "checkpoints/step-00000015.pt")["epoch_metrics"]
    assert [e["epoch"] for e in epochs if "knn_accuracy" in e] == [2, 4, 5] and len(passes) == 3
    knn_rows = (run / "live" / "plots" / "metrics" / "knn_accuracy.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in knn_rows] == ["1", "3", "4"]  # DVCLive's steps count epochs from 0
    scored = [meta["step"] for meta in CheckpointManager(LocalStore(run)).list() if meta["knn_accuracy"] is not None]
    assert sorted(scored) == [12, 15]  # the kept checkpoints (last 3) that had a pass: epochs 4 and 5

    passes.clear()
    pretrain(_tiny_config(epochs=2, knn_every=0, checkpoint_every=0), tiny_prepared, tmp_path / "none", DistEnv())
    assert passes == []


@pytest.mark.slow  # compiling takes about 30 s on 2 cores
def test_compiled_model_trains_to_the_eager_runs_losses(tiny_prepared, tmp_path, caplog):
    with caplog.at_level("INFO", logger="simclr.pretrain"):
        pretrain(_tiny_config(epochs=1, compile="default"), tiny_prepared, tmp_path / "compiled", DistEnv())
    assert "torch.compile mode default" in caplog.text
    pretrain(_tiny_config(epochs=1), tiny_prepared, tmp_path / "eager", DistEnv())
    compiled, eager = _weights(tmp_path / "compiled" / "model.pt"), _weights(tmp_path / "eager" / "model.pt")
    assert set(compiled) == set(eager)  # the plain model's names (no "_orig_mod." prefix): evaluation loads it
    assert _first_epoch_loss(tmp_path / "compiled") == pytest.approx(_first_epoch_loss(tmp_path / "eager"), rel=1e-4)
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.multiproc
def test_compiled_two_processes_give_the_single_process_loss(tiny_prepared, tmp_path):
    # torch.compile over DDP and GlobalBatchNorm's collectives (gloo): the graph breaks where it must
    # and the global batch's loss is still the one process's
    settings = [*TINY_PRETRAIN, "--epochs", "1", "--batch-size", "48", "--compile", "default"]
    _one_and_two_processes(tiny_prepared, tmp_path, settings)
    assert _first_epoch_loss(tmp_path / "two") == pytest.approx(_first_epoch_loss(tmp_path / "one"), rel=1e-4, abs=1e-5)


def test_compile_without_a_compiler_exits_2_naming_the_setting(tiny_prepared, tmp_path):
    # PATH holds only python's own directory: no g++, clang++ or c++ for inductor's CPU kernels
    bare_path = tmp_path / "bin"
    bare_path.mkdir()
    (bare_path / "python").symlink_to(sys.executable)
    env = {"PATH": str(bare_path), "CXX": "", "CC": ""}
    result = run_cli("pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), *TINY_PRETRAIN,
                     "--epochs", "1", "--compile", "default", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pretrain.compile 'default' builds torch.compile's kernels on cpu, which needs a compiler" in result.stderr
    assert "WITH_COMPILER=true" in result.stderr
    assert not (tmp_path / "run" / "model.pt").exists()


def test_compile_without_pythons_headers_is_refused_before_anything_runs(monkeypatch, tmp_path):
    # inductor's CPU kernels and Triton's launcher both include Python.h: a base image without
    # python3-dev would otherwise fail at the first step, minutes into the run
    monkeypatch.setattr(model_setup.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"needs Python's C headers .*python3-dev"):
        model_setup.compiled(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
