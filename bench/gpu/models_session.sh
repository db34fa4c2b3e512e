# The model families on one GPU. Every stage starts with the GPU install as Dockerfile.gpu runs
# it (scripts/bootstrap.sh --cuda server, over the machine's CUDA torch, offline from the wheels
# bench/gpu/carry.sh made), skipped when the venv is already there.
#   STAGE=engine  the families' GPU tests (Triton kernels and CUDA graphs against transformers),
#                 then bench/gpu/families.py on the Qwen2.5-7B and Llama-3-8B presets: logits
#                 against transformers and decode steps at batch 1 and 64 against the floor
#   STAGE=served  each of those presets through `alise up --device cuda` from that install, and
#                 bench/gpu/served_decode.py: decode time per token at batch 1 and 64, served,
#                 beside the engine stage's floor (its families.json must be in $FLOOR); per
#                 variant of SERVED_VARIANTS (default "async", the worker's default: overlapped
#                 steps; "sync async": each preset served twice, first with
#                 `alise worker --no-async-steps`, steps one after another)
#   STAGE=all     families.py, then served, then the GPU tests with what is left of DEADLINE_S
#                 (default 560 s from the start): one call when device time is short
#   here:  bench/gpu/carry.sh     there (carry .whl .devcarry/minilm-tok):
#          OUT=$OUT STAGE=engine bash bench/gpu/models_session.sh
#          OUT=$OUT STAGE=served FLOOR=/tmp/families.json bash bench/gpu/models_session.sh
#          OUT=$OUT STAGE=served SERVED_VARIANTS="sync async" FLOOR=/tmp/families.json bash bench/gpu/models_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PRESETS=${PRESETS:-qwen2.5-7b llama-3-8b}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
venv=/tmp/alise-gpu-venv
py=$venv/bin/python
t0=$(date +%s)
left() { echo $(( ${DEADLINE_S:-560} - ($(date +%s) - t0) )); }
if [ ! -x "$venv/bin/alise" ]; then
  mkdir -p /tmp/minilm && cp -r .devcarry/minilm-tok/. /tmp/minilm/
  start=$(date +%s)
  PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl" PYTHON="${PYTHON:-python3}" \
    scripts/bootstrap.sh --cuda --venv "$venv" server > "$OUT/install.txt" 2>&1 \
    || { echo "== install failed"; tail -30 "$OUT/install.txt"; exit 1; }
  "$py" -m pip install -q --no-index --find-links "$PWD/.whl" pytest >> "$OUT/install.txt" 2>&1
  echo "== GPU install in $(( $(date +%s) - start )) s"
  grep "^bootstrap:" "$OUT/install.txt"
fi
gpu_tests() {
    start=$(date +%s)
    timeout "${TEST_S:-210}" "$py" -m pytest -q -p no:cacheprovider --durations=5 tests/gpu/test_gpu_families.py \
      > "$OUT/gpu_tests.txt" 2>&1
    echo "== families' GPU tests: rc $? in $(( $(date +%s) - start )) s"
    grep -E "^family |passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -40
}
families() {
    start=$(date +%s)
    timeout "${BENCH_S:-300}" "$py" bench/gpu/families.py --presets "${PRESETS// /,}" \
      --out "$OUT/families.json" > "$OUT/families.txt" 2>&1
    echo "== families.py: rc $? in $(( $(date +%s) - start )) s"
    cp "$OUT/families.json" /tmp/families.json 2>/dev/null
    grep -E "copy|built and planned|FAILED" "$OUT/families.txt"
    sed -n '/^preset /,$p' "$OUT/families.txt"
}
served() {
    for preset in $PRESETS; do
     for variant in ${SERVED_VARIANTS:-async}; do
      [ "$(left)" -gt 120 ] || { echo "== $preset $variant: skipped, $(left) s left"; continue; }
      state=/tmp/st-$preset-$variant; rm -rf "$state"
      flags=(--async-steps); [ "$variant" = sync ] && flags=(--no-async-steps)
      # The kernel plan of the first variant is kept for the second: start-up checks and
      # timings run once per preset.
      start=$(date +%s)
      "$venv/bin/alise" up --device cuda --model "$preset" --no-predictor --max-model-len 2048 \
        --kernel-plan "/tmp/plan-$preset.json" "${flags[@]}" \
        --state-dir "$state" > "$OUT/up-$preset-$variant.txt" 2>&1 &
      up=$!
      for _ in $(seq $(( ${SERVE_S:-200} * 2 ))); do
        grep -q "cluster ready" "$OUT/up-$preset-$variant.txt" && break
        kill -0 "$up" 2>/dev/null || break
        sleep 0.5
      done
      if grep -q "cluster ready" "$OUT/up-$preset-$variant.txt"; then
        echo "== $preset $variant: alise up ready in $(( $(date +%s) - start )) s"
        timeout 60 "$py" bench/gpu/served_decode.py --preset "$preset" --floor-json "${FLOOR:-/tmp/families.json}" \
          --variant "$variant" --out "$OUT/served-$preset-$variant.json"
        "$venv/bin/alise" status --state-dir "$state" | head -8
      else
        echo "== $preset $variant: alise up not ready"; tail -20 "$OUT/up-$preset-$variant.txt"
        tail -n 20 "$state"/logs/*.log
      fi
      kill -INT "$up" 2>/dev/null; wait "$up"
      echo "== $preset $variant: alise up exited with $?"
      grep -hE "loaded |kernel plan|graphs|async steps" "$state"/logs/worker*.log 2>/dev/null | head -6
     done
    done
}
case ${STAGE:?} in
  engine) gpu_tests; families ;;
  served) served ;;
  all) BENCH_S=${BENCH_S:-170} families; SERVE_S=${SERVE_S:-130} served
       [ "$(left)" -gt 40 ] && TEST_S=$(( $(left) - 15 )) gpu_tests ;;
esac
