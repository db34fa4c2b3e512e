#!/usr/bin/env bash
# Serving runs on the GPU machine, this tree against a baseline checkout in one call.
#   OUT=$OUT TRACE=.devcarry/serving/trace.jsonl MODE=once \
#     RUNS="new:fcfs:938:64:new938 base:fcfs:938:64:base938" bash bench/gpu/loop_runs.sh
# RUNS: tree (new | base: .devcarry/baseline from bench/gpu/carry.sh), policy, device blocks,
# sequences, tag[, kv planner]. MODE: once (every request at arrival 0: saturated), rate:R
# (rescaled to R req/s), trace (the trace's own arrival times). Each run starts fresh
# services (predictor too, for the policies that use it) on a fresh copy of the predictor's
# index; the same client (this tree's SDK, bench/gpu/drive.py) drives both trees; this tree's
# workers keep their kernel plan in /tmp/plan-<seqs>.json for the next start. Wheels are
# installed under /tmp/site on the first call of a warm machine; the MiniLM weights, when
# carried (.devcarry/minilm-fp16), are served in fp32 from /tmp/minilm.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; TRACE=${TRACE:-.devcarry/serving/trace.jsonl}; MODE=${MODE:-once}
# MODEL / DEVICE / DTYPE / PY: what the workers serve and the interpreter (a CPU dry run of the
# script: MODEL=tiny-llama DEVICE=cpu DTYPE=float32 PY=.venv/bin/python).
MODEL=${MODEL:-opt-13b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}; PY=${PY:-python3}
NEW=$PWD; D=.devcarry
mkdir -p "$OUT"
. bench/gpu/site.sh
if [ -f $D/minilm-fp16/model.safetensors ] && [ ! -f /tmp/minilm/model.safetensors ]; then
  PYTHONPATH=/tmp/site $PY - <<'PY'
from safetensors.torch import load_file, save_file
w = load_file(".devcarry/minilm-fp16/model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in w.items()}, "/tmp/minilm/model.safetensors",
          metadata={"format": "pt"})
PY
fi
# A tree's source: src/, or clients/ and services/ in a baseline from before the single source root.
roots_of() { if [ -d "$1/src/alise" ]; then echo "$1/src"; else echo "$1/clients:$1/services"; fi; }
path_of() { local code=$NEW; [ "$1" = base ] && code=$NEW/$D/baseline; echo "/tmp/site:$(roots_of "$code"):$NEW/$D/pkg"; }
NEWPATH=$(path_of new)
alise_new() { PYTHONPATH=$NEWPATH $PY -m alise.cli.main "$@"; }
wait_healthy() { for _ in $(seq 900); do alise_new health "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not healthy: $1"; return 1; }
case $MODE in once) DRIVE=(--all-at-once);; rate:*) DRIVE=(--rate "${MODE#rate:}");; *) DRIVE=();; esac
for run in ${RUNS:?}; do
  IFS=: read -r tree policy blocks seqs tag planner <<< "$run"
  P=$(path_of "$tree")
  pids=()
  if [ "$policy" != fcfs ]; then
    if [ ! -d /tmp/idx-base ]; then
      args=(); for f in $D/serving/train/*.jsonl.gz; do args+=(--data "$f"); done
      alise_new predictor build "${args[@]}" --index-dir /tmp/idx-base > "$OUT/predictor-build.log" 2>&1 \
        || { tail -20 "$OUT/predictor-build.log"; exit 1; }
    fi
    rm -rf /tmp/idx && cp -r /tmp/idx-base /tmp/idx
    PYTHONPATH=$NEWPATH $PY -m alise.cli.main predictor serve --index-dir /tmp/idx --address 127.0.0.1:50053 \
      > "$OUT/$tag-predictor.log" 2>&1 & pids+=($!)
    wait_healthy 127.0.0.1:50053 || exit 1
    pred=(--predictor 127.0.0.1:50053)
  else
    pred=()
  fi
  PYTHONPATH=$P $PY -m alise.cli.main scheduler --address 127.0.0.1:50051 --policy "$policy" \
    ${planner:+--kv-planner "$planner"} --model $MODEL "${pred[@]}" --job-log "$OUT/$tag-jobs.jsonl" \
    > "$OUT/$tag-scheduler.log" 2>&1 & pids+=($!)
  # This tree's scheduler takes workers on a listener of their own (the client port + 1).
  wport=50051; [ "$tree" = new ] && wport=50052
  PYTHONPATH=$P $PY -m alise.cli.main worker --scheduler 127.0.0.1:$wport --model $MODEL --device $DEVICE \
    --dtype $DTYPE --num-device-blocks "$blocks" --max-num-seqs "$seqs" --health-address 127.0.0.1:50060 \
    --step-log "$OUT/$tag-steps.jsonl" ${WORKER_ARGS:-} $([ "$tree" = new ] && echo --kernel-plan /tmp/plan-$seqs.json) \
    > "$OUT/$tag-worker.log" 2>&1 & pids+=($!)
  wait_healthy 127.0.0.1:50051 && wait_healthy 127.0.0.1:50060 || { tail -30 "$OUT/$tag-"*.log; exit 1; }
  PYTHONPATH=$NEWPATH $PY bench/gpu/drive.py --trace "$TRACE" --tag "$tag" "${DRIVE[@]}" ${NUM:+--num "$NUM"} \
    --steps "$OUT/$tag-steps.jsonl" --out "$OUT" 2>&1 | tee -a "$OUT/summary.txt"
  kill -TERM "${pids[@]}"; wait "${pids[@]}"
done
cat "$OUT/summary.txt"
