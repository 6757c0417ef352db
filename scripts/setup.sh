#!/usr/bin/env bash
# Create .venv (if missing) and install simclr-kubeflow with its pinned torch/torchvision.
# Idempotent; installs Debian's python3-venv first when the system Python lacks venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_PACKAGES=()
"$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv python3-pip)
command -v git >/dev/null 2>&1 || APT_PACKAGES+=(git)
# Real Fashion-MNIST for the default run, from Debian (nothing is downloaded at run time).
[ -d /usr/share/datasets/fashion-mnist ] || APT_PACKAGES+=(dataset-fashion-mnist)
# The tests start Debian's Prometheus server (and Pushgateway) on 127.0.0.1.
if [ "$EXTRAS" = "test" ]; then
    command -v prometheus >/dev/null 2>&1 || APT_PACKAGES+=(prometheus)
    command -v prometheus-pushgateway >/dev/null 2>&1 || APT_PACKAGES+=(prometheus-pushgateway)
fi
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
    echo "setup: installing ${APT_PACKAGES[*]} with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
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
