"""`simclr summary`: one line per stage, read from the metrics files dvc.yaml's stages write."""

from __future__ import annotations

import json
from pathlib import Path

from simclr_core.cli import main


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value) if not isinstance(value, str) else value)


def test_summary_puts_each_figure_beside_its_baseline(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs / "pretrain/live/metrics.json", {"epoch": 6, "step": 5, "knn_accuracy": 0.776, "loss": 2.9})
    _write(runs / "pretrain/live/plots/metrics/knn_accuracy.tsv", "step\tknn_accuracy\n0\t0.739\n5\t0.776\n")
    _write(runs / "linear_eval/metrics.json", {"top1": 0.8548, "top5": 0.998, "random_init_top1": 0.2561})
    _write(runs / "finetune/metrics.json", {
        "labels_10pct": {"top1": 0.8333, "scratch_top1": 0.7915, "top5": 1, "scratch_top5": 1},
        "labels_1pct": {"top1": 0.774, "scratch_top1": 0.6935, "top5": 1, "scratch_top5": 1},
    })
    _write(runs / "transfer/metrics.json", {"linear_top1": 0.9721, "linear_random_init_top1": 0.3621,
                                            "finetune_top1": 0.9526, "finetune_random_init_top1": 0.9164})
    _write(runs / "report/metrics.json", {"neighbour_precision": None})

    assert main(["summary", "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pretrain     kNN accuracy on val 77.60% after epoch 6 (after epoch 1: 73.90%)",
        "linear eval  top-1 85.48%   random init 25.61%",
        "finetune     1% of the labels: top-1 77.40%   from scratch 69.35%",
        "             10% of the labels: top-1 83.33%   from scratch 79.15%",
        "transfer     linear top-1 97.21%   random init 36.21%",
        "             fine-tuned top-1 95.26%   random init 91.64%",
        "report       nearest neighbours of the query's class n/a",
    ]


def test_missing_and_broken_results_are_named_not_fatal(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs / "linear_eval/metrics.json", "{not json")
    _write(runs / "finetune/metrics.json", {"labels_10pct": "a string"})
    assert main(["summary", "--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pretrain     no results ({runs}/pretrain/live/metrics.json is missing)"
    assert lines[1] == f"linear eval  unreadable results in {runs}/linear_eval/metrics.json"
    assert lines[2] == f"finetune     unreadable results in {runs}/finetune/metrics.json"
    assert len(lines) == 5


def test_summary_names_the_epochs_of_a_metric_logged_every_few_epochs(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs / "pretrain/live/metrics.json", {"epoch": 12, "step": 11, "knn_accuracy": 0.81})
    # with pretrain.knn_every 5 the kNN rows are epochs 5, 10 and the last (DVCLive's step is the epoch - 1)
    _write(runs / "pretrain/live/plots/metrics/knn_accuracy.tsv", "step\tknn_accuracy\n4\t0.5\n9\t0.75\n11\t0.81\n")
    assert main(["summary", "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "pretrain     kNN accuracy on val 81.00% after epoch 12 (after epoch 5: 50.00%)"


def test_summary_shows_linear_evals_knn_figure_when_it_was_computed(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs / "linear_eval/metrics.json", {"top1": 0.8548, "random_init_top1": 0.2561, "knn_top1": 0.8012, "random_init_knn_top1": 0.3001})
    assert main(["summary", "--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("linear eval  top-1 85.48%   random init 25.61%")
    assert lines[at + 1] == "             kNN top-1 80.12%   random init 30.01%"


def test_summary_names_the_epoch_of_the_last_knn_pass_of_a_run_stopped_between_passes(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs / "pretrain/live/metrics.json", {"epoch": 12, "step": 11, "knn_accuracy": 0.75})  # DVCLive keeps the last logged
    _write(runs / "pretrain/live/plots/metrics/knn_accuracy.tsv", "step\tknn_accuracy\n4\t0.5\n9\t0.75\n")
    assert main(["summary", "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "pretrain     kNN accuracy on val 75.00% after epoch 10 (after epoch 5: 50.00%)"
