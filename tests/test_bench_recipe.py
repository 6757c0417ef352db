"""benchmarks/bench_recipe.py runs on a CPU with --tiny (as CI runs it), writes its section, imports
nothing the device machine lacks, and a second call on the same --work continues the first."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO, cli_env
from tests.test_bench_gpu import as_on_the_device

ROWS = (
    "prepare", "pretrain, resnet18 x 0.125, 2 epochs at B=16", "pretrain speed, last epoch", "kNN on val at the last epoch (the monitor)",
    "linear eval top-1 on test", "kNN top-1 on test (bank: every training image)", "linear eval (both encoders, kNN included)",
)


def _run(results, work) -> dict[str, tuple[str, str]]:
    run = subprocess.run(
        [*as_on_the_device("bench_recipe.py"), "--tiny", "--device", "cpu", "--work", str(work),
         "--results", str(results)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    section = results.read_text().split("## bench_recipe (cpu, cifar10-gpu.yaml, tiny)\n")[1]
    table = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    return {cells[0].removeprefix("| "): (cells[1], cells[2]) for cells in table}


def test_tiny_recipe_writes_every_row_and_a_second_call_continues_the_first(tmp_path):
    results, work = tmp_path / "RESULTS.md", tmp_path / "work"
    first = _run(results, work)
    assert tuple(first) == ROWS
    assert first["prepare"][0].endswith(" s") and "90 images" in first["prepare"][1]
    assert "resumed" not in first[ROWS[1]][1] and first[ROWS[1]][0].endswith(" s)")
    for row in ("linear eval top-1 on test", "kNN top-1 on test (bank: every training image)"):
        assert 0 <= float(first[row][0].strip("*%")) <= 100 and "random-init encoder" in first[row][1]

    again = _run(results, work)  # the same --work: the dataset is kept and pretraining resumes at its end
    assert again["prepare"][0] == "kept"
    assert "resumed from step 8 of 8" in again[ROWS[1]][1]
    assert results.read_text().count("## bench_recipe (") == 1  # the section replaced, not added twice
