"""benchmarks/bench_gpu.py runs on a CPU with --tiny (as CI runs it) and writes its whole GPU
section; it imports nothing the device machine lacks (dvclive, kfp, google-cloud-storage)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

MISSING_ON_THE_DEVICE = ("dvclive", "kfp", "google.cloud", "google.cloud.storage", "boto3")
ROWS = (
    "end to end (pretrain loop)", "bare forward+backward", "**efficiency** (end to end / bare)", "bare + NT-Xent + LARS step",
    "NT-Xent + LARS share of the step", "trainer's data wait", "host syncs per step", "peak memory",
)
SETTINGS = ("tiny ResNet-18 (width 1/8), 16 px, CIFAR stem, B=8", "tiny ResNet-50 (width 1/8), 32 px, B=4, blur on")

_RUNNER = """
import runpy, sys
for name in {missing!r}:
    sys.modules[name] = None
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/{script}", *sys.argv[1:]]
runpy.run_path("benchmarks/{script}", run_name="__main__")
"""


def as_on_the_device(script: str) -> list[str]:
    """The argv that runs ``benchmarks/SCRIPT`` as ``python benchmarks/SCRIPT`` (the caller appends its
    arguments) with the modules the device machine lacks made unimportable."""
    return [sys.executable, "-c", _RUNNER.format(missing=MISSING_ON_THE_DEVICE, script=script)]


def test_tiny_cpu_run_writes_every_row_and_keeps_the_other_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench_other\n\n| measurement | value | note |\n|---|---|---|\n| x | 1 | y |\n")
    run = subprocess.run(
        [*as_on_the_device("bench_gpu.py"), "--tiny", "--device", "cpu", "--results", str(results)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = results.read_text()
    assert "## bench_other\n" in text and "| x | 1 | y |" in text
    section = text[text.index("## bench_gpu (cpu, tiny)\n"):]
    assert "- command: `python3 benchmarks/bench_gpu.py --tiny --device cpu --results" in section
    assert f"torch {__import__('torch').__version__}" in section
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert len(table) == len(ROWS) * len(SETTINGS)
    for setting in SETTINGS:
        for row in ROWS:
            assert any(line.startswith(f"| {row}, {setting}, fp32 | ") for line in table), (row, setting)
    efficiency = next(line for line in table if "efficiency" in line).split("|")[2].strip().strip("*")
    assert float(efficiency) > 0


@pytest.mark.slow
def test_tiny_compiled_run_writes_a_section_of_its_own(tmp_path):
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [*as_on_the_device("bench_gpu.py"), "--tiny", "--device", "cpu", "--compile", "default",
         "--results", str(results)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    section = results.read_text().split("## bench_gpu (cpu, tiny, torch.compile default)\n")[1]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert len(table) == len(ROWS) * len(SETTINGS)
    assert all(", fp32, torch.compile default | " in line for line in table)
