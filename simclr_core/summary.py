"""One line per stage of a finished run: its figure beside its baseline (``simclr summary``).

``dvc metrics show`` prints every key of every stage as one wide table; this reads the same
metrics.json files (the layout of dvc.yaml: ``runs/<stage>/metrics.json``, pretraining's in
``runs/pretrain/live/``) and prints what a reader looks for first::

    pretrain     kNN accuracy on val 77.60% after epoch 6 (after epoch 1: 73.90%)
    linear eval  top-1 85.48%   random init 25.61%
    ...

A stage whose file is missing or unreadable is reported as such; nothing here fails a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

__all__ = ["summary_lines"]

_WIDTH = 13  # the stage column


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pretrain(metrics: dict[str, Any], runs: Path) -> list[str]:
    passes = _epoch_values(runs / "pretrain" / "live" / "plots" / "metrics" / "knn_accuracy.tsv")
    first = f" (after epoch {passes[0][0]}: {_percent(passes[0][1])})" if len(passes) > 1 else ""
    epoch = passes[-1][0] if passes else metrics.get("epoch", 0)  # of the last pass (counted from 1), whose figure metrics holds
    return [f"kNN accuracy on val {_percent(metrics.get('knn_accuracy'))} after epoch {epoch}{first}"]


def _epoch_values(tsv: Path) -> list[tuple[int, float]]:
    """(epoch counted from 1, value) of each row of a DVCLive metric's .tsv (a header naming a ``step``
    column, the value last; DVCLive's step is the epoch counted from 0). A metric logged every few
    epochs (``pretrain.knn_every``) has rows for those epochs only."""
    try:
        header, *rows = [line.split("\t") for line in tsv.read_text().splitlines() if line]
        step = header.index("step")
        return [(int(row[step]) + 1, float(row[-1])) for row in rows]
    except (OSError, ValueError, IndexError):
        return []


def _linear(metrics: dict[str, Any], runs: Path) -> list[str]:
    lines = [f"top-1 {_percent(metrics.get('top1'))}   random init {_percent(metrics.get('random_init_top1'))}"]
    if "knn_top1" in metrics:
        lines.append(f"kNN top-1 {_percent(metrics['knn_top1'])}   random init {_percent(metrics.get('random_init_knn_top1'))}")
    return lines


def _finetune(metrics: dict[str, Any], runs: Path) -> list[str]:
    lines = []
    for key, values in sorted(metrics.items(), key=lambda item: float(item[0].split("_")[1].removesuffix("pct") or 0)):
        share = key.removeprefix("labels_").replace("pct", "% of the labels")
        lines.append(f"{share}: top-1 {_percent(values.get('top1'))}   from scratch {_percent(values.get('scratch_top1'))}")
    return lines


def _transfer(metrics: dict[str, Any], runs: Path) -> list[str]:
    return [
        f"linear top-1 {_percent(metrics.get('linear_top1'))}   random init {_percent(metrics.get('linear_random_init_top1'))}",
        f"fine-tuned top-1 {_percent(metrics.get('finetune_top1'))}   random init {_percent(metrics.get('finetune_random_init_top1'))}",
    ]


def _report(metrics: dict[str, Any], runs: Path) -> list[str]:
    return [f"nearest neighbours of the query's class {_percent(metrics.get('neighbour_precision'))}"]


STAGES: list[tuple[str, str, Callable[[dict[str, Any], Path], list[str]]]] = [
    ("pretrain", "pretrain/live/metrics.json", _pretrain),
    ("linear eval", "linear_eval/metrics.json", _linear),
    ("finetune", "finetune/metrics.json", _finetune),
    ("transfer", "transfer/metrics.json", _transfer),
    ("report", "report/metrics.json", _report),
]


def summary_lines(runs: str | Path) -> list[str]:
    """The summary of the run under ``runs`` (dvc.yaml's layout), one or more lines per stage."""
    runs = Path(runs)
    lines = []
    for stage, relative, describe in STAGES:
        path = runs / relative
        metrics = _read(path)
        try:
            if metrics is None:
                texts = [f"unreadable results in {path}" if path.exists() else f"no results ({path} is missing)"]
            else:
                texts = describe(metrics, runs)
        except (AttributeError, TypeError, ValueError):
            texts = [f"unreadable results in {path}"]
        for index, text in enumerate(texts):
            lines.append(f"{stage if index == 0 else '':<{_WIDTH}}{text}")
    return lines
