"""What the components' bodies share at run time (they run in the project's image).

KFP lightweight components ship only their function's source; anything else they use must
be importable in the image. These helpers turn component inputs into `simclr` command lines
and the CLI's result files into KFP artifacts. Nothing here knows the method.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_IMAGE = "ghcr.io/simclr-kubeflow/simclr:0.1.0"
MODEL_FILE = "model.pt"


def cli_options(settings: dict[str, Any] | None = None, **named: Any) -> list[str]:
    """``--name value`` pairs for the CLI: ``named`` first, then ``settings`` (which win).

    Names are the params.yaml field names (``batch_size`` -> ``--batch-size``); lists become
    comma-separated; None values are left out (the CLI's default applies). Whole floats are
    written as integers: KFP passes every number inside a dict or list parameter as a double
    (protobuf Struct), and ``--knn-bank-size 200.0`` would not parse as an int.
    """
    merged = {**named, **(settings or {})}
    options: list[str] = []
    for name, value in merged.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(_text(item) for item in value)
        options += [f"--{name.replace('_', '-')}", _text(value)]
    return options


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def run_simclr(args: list[str]) -> None:
    """Run ``simclr ARGS`` (this interpreter's ``-m simclr_core``), its output into the step's log.

    It runs in a scratch directory, so a stray params.yaml in the working directory never
    changes its settings: the component's inputs (and the CLI's defaults) are all there is.
    Raises RuntimeError naming the command and exit code when it fails.
    """
    command = [sys.executable, "-m", "simclr_core", *args]
    print("+ simclr " + " ".join(args), flush=True)
    with tempfile.TemporaryDirectory(prefix="simclr-step-") as scratch:
        code = subprocess.call(command, cwd=scratch, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        kind = "bad input or settings" if code == 2 else "failure"
        raise RuntimeError(f"`simclr {args[0]}` exited with code {code} ({kind}); its log above says why")


def model_file(path: str) -> str:
    """The checkpoint inside a Model artifact: the path itself if a file, else its model.pt."""
    candidate = Path(path)
    return str(candidate / MODEL_FILE) if candidate.is_dir() else str(candidate)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a_b": 1.0}: KFP Metrics hold flat name -> number pairs."""
    flat: dict[str, float] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, key + "_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def log_metrics(metrics, values: dict[str, Any]) -> None:
    """Every number of ``values`` (nested dicts flattened) onto a KFP Metrics artifact."""
    for name, value in flatten(values).items():
        metrics.log_metric(name, value)


def confusion_matrix(rows: list[dict[str, str]], class_names: list[str]) -> list[list[int]]:
    """Counts [actual][predicted] from the CLI's confusion.json rows ({"actual", "predicted"})."""
    index = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    for row in rows:
        matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    return matrix


def copy_tree(source: str | Path, destination: str | Path) -> None:
    """Copy a directory's contents into ``destination`` (created), replacing what is there."""
    shutil.copytree(source, destination, dirs_exist_ok=True)
