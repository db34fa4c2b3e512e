#!/usr/bin/env bash
# Creates a virtual environment and installs ALISE into it (editable), saying what it installs,
# and at the end which torch it got: its version, its build (CPU or CUDA), whether a GPU is
# visible (and, with --cuda, triton, which the worker's fused kernels need).
#
# Usage: scripts/bootstrap.sh [--cuda] [--venv DIR] [EXTRAS]
#   EXTRAS      ALISE's extras (default server,tools,dev; "" = the SDK and CLI only)
#   --venv DIR  the environment to make, or to install into if it exists (default .venv)
#   --cuda      a CUDA build of torch. When the Python making the environment has one already (a
#               CUDA base image, a GPU machine), the environment sees that Python's packages
#               (--system-site-packages, and the packages of the environment it is itself in)
#               and nothing is downloaded for torch; otherwise torch==2.13.0 comes from PyPI,
#               whose Linux x86_64 wheels are CUDA builds (TORCH_INDEX_URL picks another index,
#               e.g. https://download.pytorch.org/whl/cu128). It fails when what it got is not
#               a CUDA build.
#   (default)   the CPU build of torch==2.13.0 for the demo and CI, from PyTorch's CPU index
#               (a plain `pip install torch` on Linux x86_64 is the multi-GB CUDA build); where
#               that index does not answer, from pip's own sources, and the build it got is said.
# PYTHON picks the interpreter (default python3; 3.11 or newer).
# Offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR installs from a folder of wheels (bench/gpu/carry.sh
# makes the GPU machine's). ALISE itself is built without build isolation where the environment
# has setuptools (68 or newer) and wheel, so nothing is fetched to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=2.13.0
cuda=0
venv=.venv
extras="server,tools,dev"
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --venv) venv="${2:?--venv needs a directory}"; shift ;;
    --venv=*) venv="${1#--venv=}" ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bootstrap: unknown option $1 (scripts/bootstrap.sh --help)" >&2; exit 2 ;;
    *) extras="$1" ;;
  esac
  shift
done
python="${PYTHON:-python3}"
say() { echo "bootstrap: $*" >&2; }
# pip's notes about this machine's extra package locations are noise here.
quiet() { grep -v "^WARNING: Location" || true; }
# cuda, cpu or none: the torch an interpreter imports.
torch_build() {
  "$1" -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || echo none
}
torch_version_of() { "$1" -c "import torch; print(torch.__version__)"; }

if [ ! -x "$venv/bin/python" ]; then
  venv_args=()
  reuse=0
  if [ "$cuda" = 1 ] && [ "$(torch_build "$python")" = cuda ]; then
    reuse=1
    venv_args=(--system-site-packages)
    say "creating $venv with $("$python" --version 2>&1), seeing its packages and its CUDA torch $(torch_version_of "$python")"
  else
    say "creating $venv with $("$python" --version 2>&1)"
  fi
  # Without ensurepip (a bare system Python), the environment uses the pip its packages hold.
  "$python" -m venv "${venv_args[@]}" "$venv" 2>/dev/null || "$python" -m venv --without-pip "${venv_args[@]}" "$venv"
  if [ "$reuse" = 1 ]; then
    # A Python that is itself in a virtual environment (the GPU machine's) keeps its packages
    # there, not in the "system" site that --system-site-packages adds: list them too.
    purelib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$python" -c "import site; print('\n'.join(site.getsitepackages()))" > "$purelib/_alise_base_site.pth"
  fi
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
build=$(torch_build "$venv/bin/python")
if [ "$cuda" = 1 ]; then
  case "$build" in
    cuda) say "torch: the CUDA build already there ($(torch_version_of "$venv/bin/python"))" ;;
    cpu) say "--cuda, but $venv holds a CPU build of torch ($(torch_version_of "$venv/bin/python")): remove it, or give --venv another directory"
         exit 1 ;;
    none) say "installing torch==$torch_version (CUDA build${TORCH_INDEX_URL:+, from $TORCH_INDEX_URL}) into $venv"
          $pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$torch_version" 2>&1 | quiet ;;
  esac
elif [[ ",$extras," == *",server,"* ]] && [ "$build" = none ]; then
  cpu_index=https://download.pytorch.org/whl/cpu
  if [ -z "${PIP_NO_INDEX:-}" ] && "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$cpu_index/', timeout=10)" 2>/dev/null; then
    say "installing torch==$torch_version (CPU build, from PyTorch's CPU index) into $venv"
    $pip install -q --index-url "$cpu_index" "torch==$torch_version" 2>&1 | quiet
  else
    # Whatever pip is pointed at (a wheel folder, a mirror, PyPI, where a Linux x86_64 torch
    # is a CUDA build); the build it got is said below.
    say "installing torch==$torch_version into $venv from pip's own sources (PyTorch's CPU index is not reachable)"
    $pip install -q "torch==$torch_version" 2>&1 | quiet
  fi
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
isolation=()
if "$venv/bin/python" -c "import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null; then
  isolation=(--no-build-isolation)  # build with the environment's own setuptools: nothing to fetch
fi
say "installing alise${extras:+[$extras]} (editable) and its dependencies into $venv"
# setuptools prints a notice about editable installs on every install: filtered.
PYTHONWARNINGS="ignore:Editable installation" $pip install -q "${isolation[@]}" -e "$target" 2>&1 | quiet
check="import alise.client, grpc"
[[ ",$extras," == *",server,"* ]] && check="$check, torch"
"$venv/bin/python" -c "$check"  # fail loudly if the install did not take
[[ ",$extras," == *",server,"* || "$cuda" = 1 ]] || exit 0
# What it got, said truthfully: a CPU build, or a CUDA one and whether this machine has a GPU.
CUDA_WANTED=$cuda "$venv/bin/python" - <<'PY'
import os
import sys

import torch

build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
gpu = f"yes, {torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "no"
print(f"bootstrap: torch {torch.__version__} ({build}); GPU visible: {gpu}", file=sys.stderr)
if os.environ["CUDA_WANTED"] == "1":
    try:
        import triton
        print(f"bootstrap: triton {triton.__version__} (the worker's fused kernels)", file=sys.stderr)
    except ImportError:
        print("bootstrap: triton is not installed: CUDA workers run the plain torch path", file=sys.stderr)
    if not torch.version.cuda:
        sys.exit("bootstrap: --cuda, but this torch is a CPU build")
PY
