#!/usr/bin/env bash
# The GPU calls of a session, one stage per call (each well inside a call's 10 minutes), in this
# order on one warm machine: the first installs the carried wheels (bench/gpu/carry.sh builds them).
#   STAGE=engine    bench/gpu/engine_check.sh: the kernels' tests, the engine before/after (issue 20)
#   STAGE=saturated the chat trace all at once, this tree against .devcarry/baseline, fcfs, at
#                   938 blocks / 64 sequences and 4,096 / 256 (busy fraction, output tok/s)
#   STAGE=sat4096   the 4,096-block pair again, the workers priced by the engine's profile
#   STAGE=rate      fcfs, alise, oracle at 6.5 req/s on the chat trace (the predictor's history
#                   carried in .devcarry/serving, MiniLM in .devcarry/minilm-fp16)
#   STAGE=bursty    the same three on .devcarry/serving/bursty.jsonl (another generator's lengths,
#                   Gamma CV 3 arrivals at 6 req/s): the simulator's check
#   OUT=$OUT STAGE=saturated bash bench/gpu/session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
case ${STAGE:?} in
  engine)
    . bench/gpu/site.sh
    export PYTHONPATH=/tmp/site
    TEST_S=${TEST_S:-120} BENCH_S=${BENCH_S:-300} bash bench/gpu/engine_check.sh ;;
  saturated)
    MODE=once NUM=${NUM:-200} RUNS="base:fcfs:938:64:base938 new:fcfs:938:64:new938 base:fcfs:4096:256:base4096 new:fcfs:4096:256:new4096" \
      bash bench/gpu/loop_runs.sh ;;
  sat4096)  # the 4,096-block pair of the saturated stage, the workers priced by the engine's profile
    export WORKER_ARGS="--latency-profile profiles/opt-13b-h200.json"
    MODE=once NUM=${NUM:-200} RUNS="base:fcfs:4096:256:base4096 new:fcfs:4096:256:new4096" bash bench/gpu/loop_runs.sh ;;
  rate)
    export WORKER_ARGS="--latency-profile profiles/opt-13b-h200.json"
    MODE=rate:6.5 RUNS="new:fcfs:938:64:fcfs65 new:alise:938:64:alise65 new:oracle:938:64:oracle65" bash bench/gpu/loop_runs.sh ;;
  bursty)
    export WORKER_ARGS="--latency-profile profiles/opt-13b-h200.json"
    MODE=trace TRACE=.devcarry/serving/bursty.jsonl RUNS="new:fcfs:938:64:fcfsB new:alise:938:64:aliseB new:oracle:938:64:oracleB" \
      bash bench/gpu/loop_runs.sh ;;
esac
# What comes back is at most 8 files: the logs in one archive, the summaries beside it.
tar -C "$OUT" -czf /tmp/runs.tgz --exclude='*.tgz' . && mv /tmp/runs.tgz "$OUT/runs-$STAGE.tgz"
find "$OUT" -maxdepth 1 -type f ! -name '*.tgz' ! -name 'summary.*' -delete
