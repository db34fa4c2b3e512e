#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs ALISE with the CPU build of torch.
# Usage: scripts/bootstrap.sh [extras]   (extras default: server,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server,dev}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  $pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
$pip install -q -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import alise.client, torch, grpc" # fail loudly if the install did not take
