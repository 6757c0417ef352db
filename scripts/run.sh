#!/usr/bin/env bash
# Set up the environment and run the whole pipeline on the default small dataset:
# `dvc repro` (prepare Fashion-MNIST and digits, pretrain, linear eval, fine-tune, transfer),
# then print every stage's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # dvc.yaml's stages call `simclr`
simclr env
start=$(date +%s)
dvc repro "$@"
echo "dvc repro took $(( $(date +%s) - start )) s"
dvc metrics show
