#!/usr/bin/env bash
# Set up the environment and run the test suite (fast tests; add -m slow or "-m ''" for more).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_tools.sh    # checkov + PodMonitor types in .venv-tools (they cannot share .venv)
exec .venv/bin/python -m pytest -m "not slow" "$@"
