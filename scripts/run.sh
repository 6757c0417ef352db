#!/usr/bin/env bash
# Set up the environment and run the whole pipeline on the default small dataset:
# `dvc repro` (prepare Fashion-MNIST and digits, pretrain, linear eval, fine-tune, transfer),
# then one line per stage: its figure beside its baseline (`simclr summary` has every key).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # dvc.yaml's stages call `simclr`
simclr env
start=$(date +%s)
dvc repro "$@"
echo "dvc repro took $(( $(date +%s) - start )) s"
simclr summary
