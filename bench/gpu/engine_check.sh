#!/usr/bin/env bash
# One call on the GPU machine (~5-7 minutes; each stage stops at its limit): the GPU tests (every
# new kernel against its reference, the engine against transformers teacher-forced under each
# kernel plan; the unchanged KV-quantization tests are left to tests/gpu), then the engine before and
# after the fused kernels in one process (issue 20's table, the mixed-step table, the kernel plan
# start-up chose, the new latency profile). Everything goes under $OUT; the short tables come last.
#   bash bench/gpu/engine_check.sh            # TEST_S / BENCH_S: stage time limits in seconds
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton, transformers
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)")
PY
start=$(date +%s)
# Kernels first, the engine last: if the stage runs out of time, the kernel verdicts are in.
timeout "${TEST_S:-210}" python3 -m pytest -q -p no:cacheprovider --durations=8 \
    tests/gpu/test_gpu_unified_kernel.py tests/gpu/test_gpu_fused_kernels.py tests/gpu/test_gpu_attention_kernel.py \
    tests/gpu/test_gpu_engine_vs_transformers.py > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))
start=$(date +%s)
timeout "${BENCH_S:-330}" python3 bench/gpu/engine_compare.py --json "$OUT/engine_compare.json" \
    --profile "$OUT/opt-13b-h200.json" > "$OUT/engine_compare.txt" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))
echo "== GPU tests: rc $tests_rc in ${tests_s} s ($OUT/gpu_tests.txt)"
grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.txt" | head -12
echo "== engine before/after: rc $bench_rc in ${bench_s} s ($OUT/engine_compare.txt)"
grep -E "start-up|plan: (add_norm|rope|fresh|unified kernel|planned)|failed|left out" "$OUT/engine_compare.txt" | head -16
sed -n '/^step  /,$p' "$OUT/engine_compare.txt"
[ "$bench_rc" -eq 0 ] || tail -25 "$OUT/engine_compare.txt"
