#!/usr/bin/env bash
# bench/scale_workers.py on the GPU machine's CPUs: one scheduler driving 1, 4, 8 and 16 virtual
# workers (the real worker service whose step is a 15 ms sleep: no GPU, no model weights, no
# faiss), its client streams in the scheduler's process (inline) and in a front process of
# their own (front, --streams-process); then the plan decision's median (bench/sched_overhead.py).
# About 4 minutes with the defaults (20 s a run, 8 runs); ARGS adds flags (e.g. --seconds 10).
#   here:  bench/gpu/carry.sh   (the wheels in .whl, the MiniLM tokenizer stand-in in .devcarry)
#   there: carry .whl and .devcarry;  OUT=$OUT bash bench/gpu/scale_workers.sh
# It prints the table; the scheduler and step logs come back as $OUT/scale-logs.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; PY=${PY:-python3}; D=.devcarry
mkdir -p "$OUT"
. bench/gpu/site.sh
PYTHONPATH=/tmp/site:$PWD/src:$PWD/$D/pkg $PY bench/scale_workers.py --out /tmp/scale-logs ${ARGS:-} \
  | tee "$OUT/scale_workers.txt"
rc=${PIPESTATUS[0]}
tar -C /tmp -czf "$OUT/scale-logs.tgz" scale-logs
exit "$rc"
