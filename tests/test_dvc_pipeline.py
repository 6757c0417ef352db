"""`dvc repro` of the whole pipeline in a scratch git repository, on tiny data (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DIST_VARS, REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _tiny_params(tiny_folder: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", source_root=str(tiny_folder), val_fraction=0.25, label_fractions=[0.1, 0.5])
    params["pretrain"].update(
        width_multiplier=0.125, image_size=0, batch_size=16, epochs=2, warmup_epochs=0.5, knn_k=5, knn_bank_size=0, num_threads=1,
        checkpoint_every=0,
        # fp32, stated: the comparisons here need no bf16 (which reached a NaN loss on CPUs with
        # native bf16, see test_bf16_autocast_is_used_when_asked_and_stays_close_to_fp32)
        precision="fp32",
    )
    params["linear_eval"].update(max_iter=20, augment_copies=1)
    params["finetune"].update(label_fractions=[0.1, 0.5], epochs=1, min_steps=2, batch_size=8)
    params["transfer_data"].update(max_train=150)
    params["transfer"].update(max_iter=20, finetune_epochs=1, l2_grid=[0.001, 0.1])
    return params


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_folder) -> Path:
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(_tiny_params(tiny_folder), sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.email", "ci@example.com"], root)
    _run(["git", "config", "user.name", "ci"], root)
    _run([str(BIN / "dvc"), "init", "-q"], root)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "project"], root)
    _run([str(BIN / "dvc"), "repro"], root)
    return root


def test_repro_writes_every_stage_metric(repo):
    pretrain = json.loads((repo / "runs/pretrain/live/metrics.json").read_text())
    assert pretrain["epoch"] == 2 and 0 <= pretrain["knn_accuracy"] <= 1
    linear = json.loads((repo / "runs/linear_eval/metrics.json").read_text())
    finetune = json.loads((repo / "runs/finetune/metrics.json").read_text())
    transfer = json.loads((repo / "runs/transfer/metrics.json").read_text())
    for value in [linear["top1"], linear["random_init_top1"], transfer["linear_top1"], transfer["finetune_random_init_top1"]]:
        assert 0.0 <= value <= 1.0
    assert set(finetune) == {"labels_10pct", "labels_50pct"}
    report = json.loads((repo / "runs/report/metrics.json").read_text())
    assert 0.0 <= report["neighbour_precision"] <= 1.0
    assert "data:image/png;base64," in (repo / "runs/report/report.html").read_text()


def test_metrics_show_has_every_stage_in_one_table(repo):
    shown = _run([str(BIN / "dvc"), "metrics", "show", "--json"], repo).stdout
    files = next(iter(json.loads(shown).values()))["data"]
    assert set(files) == {
        "runs/pretrain/live/metrics.json", "runs/linear_eval/metrics.json", "runs/finetune/metrics.json", "runs/transfer/metrics.json",
        "runs/report/metrics.json",
    }
    table = _run([str(BIN / "dvc"), "metrics", "show"], repo).stdout
    assert "random_init_top1" in table and "labels_10pct.scratch_top1" in table


def test_repro_again_changes_nothing_and_plots_render(repo):
    second = _run([str(BIN / "dvc"), "repro"], repo).stdout
    assert "didn't change, skipping" in second and "Running stage" not in second
    plots = json.loads(_run([str(BIN / "dvc"), "plots", "show", "--json"], repo).stdout)
    assert any("loss" in json.dumps(entry) for entry in plots.values())


def test_exp_run_with_a_changed_param_reruns_pretraining(repo):
    result = _run([str(BIN / "dvc"), "exp", "run", "-S", "pretrain.epochs=1"], repo)
    assert "Running stage 'pretrain'" in result.stdout
    assert "Running stage 'prepare'" not in result.stdout


def test_push_to_a_local_remote_and_pull_into_a_fresh_clone(repo, tmp_path):
    remote = tmp_path / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "pipeline"], repo)
    _run([str(BIN / "dvc"), "push"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run([str(BIN / "dvc"), "pull"], clone)
    assert (clone / "data/prepared/train_images.npy").read_bytes() == (repo / "data/prepared/train_images.npy").read_bytes()
    assert (clone / "runs/pretrain/model.pt").is_file()
    assert (clone / "runs/pretrain/checkpoints/latest.json").is_file()
