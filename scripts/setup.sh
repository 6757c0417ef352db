#!/usr/bin/env bash
# Create .venv (if missing) and install simclr-kubeflow with its pinned torch/torchvision.
# Idempotent; installs Debian's python3-venv first when the system Python lacks venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
    echo "setup: $PYTHON has no venv/ensurepip; installing python3-venv with apt-get" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq python3-venv python3-pip
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 are pinned in pyproject.toml (a 5.5 GB CUDA build that
# also runs on the CPU); the first install takes a few minutes.
.venv/bin/python -m pip install --quiet --progress-bar off -e ".${EXTRAS:+[$EXTRAS]}" \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
.venv/bin/python -c "import simclr_core, torch, torchvision; print(f'setup: simclr_core {simclr_core.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}')"
