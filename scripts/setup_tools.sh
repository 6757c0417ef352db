#!/usr/bin/env bash
# Create .venv-tools (if missing): the scanners the tests run that cannot share .venv.
#
# checkov pins packaging<24, networkx 2.x and more: in .venv it would downgrade what pytest
# (packaging>=24), torch and dvc use. cloudcoil-models-prometheus-operator holds the
# Prometheus operator's CRD types (PodMonitor), generated from its CRDs, for offline validation.
# scripts/fetch_protos.py keeps the protobuf definitions of older Kubeflow Pipelines releases
# under .venv-tools/protos/ (tests/test_kfp_backends.py parses the pipeline with them).
# Idempotent: a second run only checks the versions.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TOOLS=(
    "checkov==3.3.30"
    "cloudcoil-models-prometheus-operator==0.80.1.0"
)

if [ ! -x .venv-tools/bin/python ]; then
    echo "setup_tools: creating .venv-tools with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv-tools
fi
"$PYTHON" scripts/fetch_protos.py 2> >(grep -v "^WARNING: Location .* is ignored" >&2) >/dev/null
# Everything pinned already installed: nothing to do (no index is asked).
if .venv-tools/bin/python - "${TOOLS[@]}" 2>/dev/null <<'EOF'; then exit 0; fi
import sys
from importlib.metadata import version
sys.exit(any(version(name) != want for name, want in (spec.split("==") for spec in sys.argv[1:])))
EOF
.venv-tools/bin/python -m pip install --quiet --progress-bar off "${TOOLS[@]}" \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
.venv-tools/bin/checkov --version >/dev/null
echo "setup_tools: checkov $(.venv-tools/bin/checkov --version) in .venv-tools"
