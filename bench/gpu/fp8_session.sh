#!/usr/bin/env bash
# fp8 KV on one GPU, one call (~3-8 minutes; each stage stops at its limit): the fp8 GPU tests
# (page bytes, the decode and unified kernels on fp8 pages, each GPU family's fp8 logits against
# fp16 pages teacher-forced), then bench/gpu/fp8_decode.py (decode attention fp16 vs fp8 pages,
# OPT-13B shapes, batch 1 and 64) and, with what is left of DEADLINE_S, its --engine stage (whole
# decode steps of the OPT-13B preset through the worker's ModelRunner). Runs on the machine's own
# python (torch, triton, transformers) with PYTHONPATH=src; everything goes under $OUT.
#   OUT=$OUT bash bench/gpu/fp8_session.sh        # DEADLINE_S (default 560), TEST_S (default 150)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-560} - ($(date +%s) - t0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
start=$(date +%s)
timeout "${TEST_S:-150}" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_gpu_fp8_kv.py \
    tests/gpu/test_gpu_fp8_runner.py > "$OUT/fp8_tests.txt" 2>&1
echo "== fp8 GPU tests: rc $? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "$(( $(left) - 20 ))" python3 bench/gpu/fp8_decode.py --out "$OUT/fp8_decode.json" > "$OUT/fp8_decode.txt" 2>&1
echo "== fp8_decode.py: rc $? in $(( $(date +%s) - start )) s"
if [ "$(left)" -gt 150 ]; then
  start=$(date +%s)
  timeout "$(( $(left) - 10 ))" python3 bench/gpu/fp8_decode.py --engine --contexts 512 \
      --out "$OUT/fp8_engine.json" > "$OUT/fp8_engine.txt" 2>&1
  echo "== fp8_decode.py --engine: rc $? in $(( $(date +%s) - start )) s"
else
  echo "== fp8_decode.py --engine: skipped, $(left) s left"
fi
grep -E "passed|failed|^FAILED|^ERROR|rel|error" "$OUT/fp8_tests.txt" | tail -25
tail -20 "$OUT/fp8_decode.txt"
tail -12 "$OUT/fp8_engine.txt" 2>/dev/null
