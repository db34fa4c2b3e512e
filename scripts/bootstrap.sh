#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs ALISE into it, saying what it installs:
# the CPU build of torch (server installs), then ALISE itself in editable mode with the
# given extras and their dependencies from PyPI. Nothing is installed outside .venv.
# Usage: scripts/bootstrap.sh [extras]   (extras default: server,dev; "" = the SDK and CLI only)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-server,dev}"
python="${PYTHON:-python3}"
say() { echo "bootstrap: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
# pip's notes about this machine's extra package locations are noise here.
quiet() { grep -v "^WARNING: Location" || true; }
if [[ ",$extras," == *",server,"* ]] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
  say "installing torch==2.13.0 (CPU build) into .venv"
  $pip install -q "torch==2.13.0" 2>&1 | quiet
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
say "installing alise${extras:+[$extras]} (editable) and its dependencies into .venv"
# setuptools prints a notice about editable installs on every install: filtered.
PYTHONWARNINGS="ignore:Editable installation" $pip install -q -e "$target" 2>&1 | quiet
check="import alise.client, grpc"
[[ ",$extras," == *",server,"* ]] && check="$check, torch"
.venv/bin/python -c "$check"  # fail loudly if the install did not take
