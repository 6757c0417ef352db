#!/usr/bin/env bash
# Set up the environment and run the default job on this machine.
# Today that is the method's benchmark (augmentations, encoder, NT-Xent; writes
# benchmarks/RESULTS.md); the local pipeline (`dvc repro`, issue 3) replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/simclr env
exec .venv/bin/python benchmarks/bench_core.py "$@"
