#!/usr/bin/env bash
# On the GPU machine (no package registry): the GPU install as Dockerfile.gpu runs it
# (scripts/bootstrap.sh --cuda server, over the machine's own CUDA torch), into a fresh venv,
# from the wheels bench/gpu/carry.sh made; then a cluster through it: `alise up --device cuda`
# with a preset (random weights), a generation, `alise status`. No predictor: its MiniLM
# weights are not carried here (it runs on the CPU, as on any machine); the presets need only
# the MiniLM tokenizer (.devcarry/minilm-tok). About 2-4 minutes.
#   here:  bench/gpu/carry.sh
#   there: carry .whl and .devcarry/minilm-tok;  OUT=$OUT bash bench/gpu/install_check.sh [PRESET]
# It prints what the install got (torch build, GPU, triton), the cluster's ready line, the
# generation and the status; the logs are under $OUT.
set -uo pipefail
preset=${1:-opt-125m}
out=${OUT:-/tmp/out}
venv=/tmp/alise-gpu-venv
state=/tmp/alise-gpu-state
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d .whl ] && [ -d .devcarry/minilm-tok ] || { echo "carry .whl and .devcarry/minilm-tok (bench/gpu/carry.sh)"; exit 3; }
mkdir -p /tmp/minilm && cp -r .devcarry/minilm-tok/. /tmp/minilm/  # where the carried stand-in points
rm -rf "$venv" "$state"
echo "== install: PIP_NO_INDEX=1 PIP_FIND_LINKS=.whl scripts/bootstrap.sh --cuda --venv $venv server"
PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl" PYTHON="${PYTHON:-python3}" \
  scripts/bootstrap.sh --cuda --venv "$venv" server > "$out/install.txt" 2>&1
rc=$?
grep "^bootstrap:" "$out/install.txt"
[ "$rc" -eq 0 ] || { echo "== install failed (rc $rc)"; tail -30 "$out/install.txt"; exit 1; }
echo "== alise up --device cuda --model $preset --no-predictor"
"$venv/bin/alise" up --device cuda --model "$preset" --no-predictor --state-dir "$state" > "$out/up.txt" 2>&1 &
up=$!
for _ in $(seq 1200); do
  grep -q "cluster ready" "$out/up.txt" && break
  kill -0 "$up" 2>/dev/null || break
  sleep 0.5
done
if grep "cluster ready" "$out/up.txt"; then
  "$venv/bin/alise" generate "The GPU says" --max-tokens 16 --ignore-eos
  "$venv/bin/alise" status --state-dir "$state"
else
  echo "== alise up did not get ready"; tail -30 "$out/up.txt"
  tail -n 30 "$state"/logs/*.log
fi
kill -INT "$up" 2>/dev/null
wait "$up"
echo "== alise up exited with $?"
cp -r "$state/logs" "$out/logs" 2>/dev/null
