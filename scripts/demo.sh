#!/usr/bin/env bash
# The main job: start the local cluster (embedded default model) and stream a generation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh server
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
state_dir="${ALISE_STATE_DIR:-.alise}"
mkdir -p "$state_dir"
alise up --state-dir "$state_dir" "$@" > "$state_dir/up.log" 2>&1 &
up_pid=$!
trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null; cat "$state_dir/up.log" | tail -n 1' EXIT
echo "starting the local cluster (logs: $state_dir/logs) ..."
for _ in $(seq 1 600); do
  if grep -q "cluster ready" "$state_dir/up.log"; then break; fi
  if ! kill -0 $up_pid 2>/dev/null; then cat "$state_dir/up.log"; exit 1; fi
  sleep 0.5
done
grep "cluster ready" "$state_dir/up.log" || { cat "$state_dir/up.log"; exit 1; }
if grep -q "RANDOM weights" "$state_dir/up.log"; then
  echo "note: the model is tiny-llama with RANDOM weights: the text below is meaningless; every request" \
       "still takes the real path (tokenizer, predictor, scheduler, paged-KV forward pass, sampling, streaming)."
fi
alise generate "Write a short poem about the sea." --max-tokens 48 --ignore-eos
alise status
