#!/usr/bin/env bash
# Set up the environment and run the test suite (fast tests; add -m slow or "-m ''" for more).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -m "not slow" "$@"
