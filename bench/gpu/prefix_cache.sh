#!/usr/bin/env bash
# Prefix caching on and off on the GPU: one command, the table last (bench/gpu/prefix_cache.py).
# Expects what bench/gpu/carry.sh builds (.whl/, .devcarry/minilm-tok/) and the trace, built
# where the data is and carried with them:
#   .venv/bin/alise trace --workload multiturn --num 120 --rate 4 --turns 2-6 --think-time-s 1 \
#       --out .devcarry/prefix/multiturn.jsonl
# Then, on the device machine (an H100: about 3 minutes):
#   OUT=$OUT bash bench/gpu/prefix_cache.sh            (MODEL, NUM, MAX_TOKENS, TRACE to change them)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
. bench/gpu/site.sh
export PYTHONPATH=/tmp/site:$PWD/src
python3 bench/gpu/prefix_cache.py --trace "${TRACE:-.devcarry/prefix/multiturn.jsonl}" --model "${MODEL:-llama-3-8b}" \
  --device cuda --num "${NUM:-120}" --max-tokens "${MAX_TOKENS:-128}"
