"""Burst intake: N streamed /v1/completions sent at once to the HTTP door of a real CPU cluster,
and when each one reached the door and the scheduler's queue, and in which order.

    python bench/burst_intake.py --num 64 128 320 [--repeat 3] [--max-tokens 4]

The cluster is `alise up`'s processes (tiny-llama, random weights, one worker, policy fcfs, no
predictor unless ``--predictor``) on free loopback ports. Prompts are AlpacaEval instructions
(../shared/data/alpaca_eval, in file order). Each request names its own ``request_id``
(``b<run>-<index>``), so the door's and the scheduler's log lines can be matched to it.

The client opens the N connections first, then writes the N requests one after another
without yielding (the client's order is the index), then reads every stream. Per request:
send time (client), door receive time (the door's completion line, its time less the elapsed
seconds it reports), queued time (the scheduler's ``queued:`` line), first token (client).
Log times have millisecond resolution: the door's inversions count pairs more than
``DOOR_RESOLUTION_S`` apart, and are an upper bound (a line's time can come a switch of the
GIL late, when the gRPC poller thread holds it); the scheduler's order is its log's line
order (exact).
Reported per run: the spread from the first to the last arrival at the door and at the queue,
the queue's cost per request (its spread / (N - 1)), the order inversions (pairs queued in the
opposite order to the client's) from client to door and from client to queue, the lag from
the client's send to the queue (p50, max) and TTFT p50/p90 from the client's send; then the
CPU time the door and the scheduler spent on the burst, per request (the few tokens streamed
included).

With ``--peer-run DIR`` it reads a GPU side-by-side's logs and results instead
(bench/gpu/peer_vllm.sh; its all-at-once run) and prints the same figures for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gzip
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from alise.cluster.config import ClusterConfig, service_commands
from alise.cluster.local import LocalCluster
from alise.core.config import SchedulingConfig
from alise.scheduler.config import SchedulerConfig
from alise.tools.lab.local_cluster import cpu_seconds, free_port
from alise.worker.config import WorkerConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4.jsonl.gz"
_LINE = re.compile(r"^(\S+ \S+) \S+ \S+ (\S+) \[([^\]]*)\]: (.*)$")
#: How far apart two door receive times must be to be told apart.
DOOR_RESOLUTION_S = 0.002
_DONE = re.compile(r"completions \d+: .*, (\d+\.\d+) s")
_DONE_TOKENS = re.compile(r"completions 200: (\d+) prompt \+ (\d+) completion tokens.*, (\d+\.\d+) s")


def prompts(num: int) -> list[str]:
    with gzip.open(DATA, "rt") as f:
        texts = [json.loads(line)["instruction"] for line in f]
    return [texts[i % len(texts)] for i in range(num)]


@contextlib.contextmanager
def intake_cluster(max_num_seqs: int, policy: str = "fcfs", predictor: bool = False):
    state = tempfile.mkdtemp(prefix="alise-burst-intake-")
    http = f"127.0.0.1:{free_port()}"
    cfg = ClusterConfig(address=f"127.0.0.1:{free_port()}", num_workers=1, predictor=predictor,
                        predictor_address=f"127.0.0.1:{free_port()}", state_dir=state,
                        worker_health_base_port=free_port(), http_address=http,
                        http_health_address=f"127.0.0.1:{free_port()}",
                        scheduler=SchedulerConfig(scheduling=SchedulingConfig(policy=policy)),
                        worker=WorkerConfig(max_num_seqs=max_num_seqs))
    cluster = LocalCluster(service_commands(cfg), log_dir=f"{state}/logs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster.start()
    try:
        cluster.wait_healthy(300)
        yield cluster, Path(state) / "logs", http
    finally:
        cluster.stop()


def request_bytes(host: str, prompt: str, request_id: str, max_tokens: int) -> bytes:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "request_id": request_id}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_stream(reader: asyncio.StreamReader) -> float | None:
    """Reads one SSE response to its end; the time its first token's event came (None: an error)."""
    status = await reader.readline()
    if b" 200 " not in status:
        return None
    first = None
    while True:
        line = await reader.readline()
        if not line or line.startswith(b"data: [DONE]"):
            return first
        if first is None and line.startswith(b"data: ") and b'"text"' in line:
            first = time.time()


async def burst(host: str, texts: list[str], run: str, max_tokens: int) -> list[dict]:
    h, p = host.rsplit(":", 1)
    conns = await asyncio.gather(*(asyncio.open_connection(h, int(p)) for _ in texts))
    rows = []
    for i, ((_, writer), text) in enumerate(zip(conns, texts, strict=True)):
        rows.append({"id": f"{run}-{i:04d}", "sent": time.time()})
        writer.write(request_bytes(host, text, rows[-1]["id"], max_tokens))
    firsts = await asyncio.gather(*(read_stream(reader) for reader, _ in conns))
    for row, first, (_, writer) in zip(rows, firsts, conns, strict=True):
        row["first"] = first
        writer.close()
    return rows


def log_times(path: Path, prefix: str) -> list[tuple[str, float, str]]:
    """(request id, wall time, message) of the log's lines about requests whose id starts with
    ``prefix``, in order."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m and m.group(3).startswith(prefix):
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((m.group(3), t, m.group(4)))
    return out


def inversions(order: list[int], times: list[float] | None = None, resolution_s: float = 0.0) -> int:
    """Pairs in the opposite order to the client's; given ``times``, only pairs further apart
    than ``resolution_s`` count (closer ones are within what the times can tell apart)."""
    return sum(1 for i in range(len(order)) for j in range(i + 1, len(order))
               if order[i] > order[j] and (times is None or times[j] - times[i] > resolution_s))


def measure(logs: Path, rows: list[dict], run: str) -> dict:
    index = {row["id"]: i for i, row in enumerate(rows)}
    for rid, t, msg in log_times(logs / "http.log", run + "-"):
        if (m := _DONE.search(msg)) is not None:
            rows[index[rid]]["door"] = t - float(m.group(1))
    queued = [(rid, t) for rid, t, msg in log_times(logs / "scheduler.log", run + "-") if msg.startswith("queued:")]
    for rid, t in queued:
        rows[index[rid]]["queued"] = t
    sent0 = min(r["sent"] for r in rows)
    door = sorted((r["door"], index[r["id"]]) for r in rows if "door" in r)
    q_times = [t for _, t in queued]
    ttfts = sorted(r["first"] - r["sent"] for r in rows if r.get("first"))
    lags = sorted(r["queued"] - r["sent"] for r in rows if "queued" in r)
    n = len(rows)
    return {
        "n": n, "ok": len(ttfts),
        "send_spread": max(r["sent"] for r in rows) - sent0,
        "door_spread": door[-1][0] - door[0][0] if door else float("nan"),
        "queue_first": min(q_times) - sent0, "queue_spread": max(q_times) - min(q_times),
        "per_request_ms": 1000 * (max(q_times) - min(q_times)) / max(len(q_times) - 1, 1),
        # The door's times: a log line's millisecond less an elapsed time rounded to one.
        "inv_door": inversions([i for _, i in door], [t for t, _ in door], DOOR_RESOLUTION_S),
        "inv_queue": inversions([index[rid] for rid, _ in queued]),
        "lag_p50": statistics.median(lags), "lag_max": lags[-1],
        "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def peer_run(directory: Path, stage: str) -> dict:
    """The same figures for a GPU side-by-side's all-at-once run (bench/gpu/peer_vllm.sh:
    logs/<stage>-http.log, logs/<stage>-scheduler.log, results/<stage>-rinf.json). Requests are
    matched to the client's by (prompt tokens, output tokens), unique there with ignore_eos;
    the run is the densest window of N arrivals at the door."""
    client = json.loads((directory / "results" / f"{stage}-rinf.json").read_text())
    keys = {key: i for i, key in enumerate(zip(client["input_lens"], client["output_lens"], strict=True))}
    arrivals = []
    for rid, t, msg in log_times(directory / "logs" / f"{stage}-http.log", ""):
        if (m := _DONE_TOKENS.search(msg)) is not None and (key := (int(m[1]), int(m[2]))) in keys:
            arrivals.append((t - float(m[3]), rid, keys[key]))
    arrivals.sort()
    n = len(keys)
    k = min(range(len(arrivals) - n + 1), key=lambda k: arrivals[k + n - 1][0] - arrivals[k][0])
    run = arrivals[k:k + n]
    index = {rid: i for _, rid, i in run}
    door_rank = {rid: k for k, (_, rid, _) in enumerate(run)}
    queued = [(rid, t) for rid, t, msg in log_times(directory / "logs" / f"{stage}-scheduler.log", "")
              if msg.startswith("queued:") and rid in index]
    q_times = [t for _, t in queued]
    arrived = {rid: t for t, rid, _ in run}
    lags = sorted(t - arrived[rid] for rid, t in queued)
    ttfts = sorted(client["ttfts"])
    return {
        "n": n, "ok": client["completed"], "send_spread": max(client["start_times"]) - min(client["start_times"]),
        "door_spread": run[-1][0] - run[0][0], "queue_first": q_times[0] - run[0][0],
        "queue_spread": q_times[-1] - q_times[0],
        "per_request_ms": 1000 * (q_times[-1] - q_times[0]) / max(len(q_times) - 1, 1),
        "inv_door": inversions([i for _, _, i in run], [t for t, _, _ in run], DOOR_RESOLUTION_S),
        "inv_queue": inversions([index[rid] for rid, _ in queued]),
        # Pairs the scheduler queued in the opposite order to the door's.
        "inv_door_queue": inversions([door_rank[rid] for rid, _ in queued]),
        "lag_p50": statistics.median(lags), "lag_max": lags[-1],
        "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, nargs="+", default=[64, 128, 320])
    p.add_argument("--repeat", type=int, default=1, help="runs of each size")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--policy", default="fcfs", help="the scheduler's policy")
    p.add_argument("--predictor", action="store_true", help="run the length predictor (each request asks it)")
    p.add_argument("--json", help="write every run's figures here")
    p.add_argument("--peer-run", type=Path, help="instead, read a GPU side-by-side's directory "
                   "(bench/gpu/peer_vllm.sh) and report its all-at-once run")
    p.add_argument("--stage", default="fcfs-mem", help="with --peer-run: the stage's file prefix")
    args = p.parse_args()
    if args.peer_run is not None:
        print(f"{args.peer_run}, {args.stage} all at once ('queue 1st' and the lags from the arrival at the "
              "door: the client's clock is not the servers')")
        figures = peer_run(args.peer_run, args.stage)
        print_table([{"run": args.stage, **figures}])
        print(f"  door -> queue inversions: {figures['inv_door_queue']}")
        return 0
    results = []
    with intake_cluster(args.max_num_seqs, args.policy, args.predictor) as (cluster, logs, host):
        pids = {name: cluster.procs[name].pid for name in ("http", "scheduler")}
        asyncio.run(burst(host, prompts(4), "warm", args.max_tokens))
        for k in range(args.repeat):
            for num in args.num:
                run = f"b{k}n{num}"
                cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
                rows = asyncio.run(burst(host, prompts(num), run, args.max_tokens))
                time.sleep(1.0)  # the door's completion lines are written
                cpu_ms = {f"{name}_cpu_ms": 1000 * (cpu_seconds(pid) - cpu[name]) / num for name, pid in pids.items()}
                results.append({"run": run, **measure(logs, rows, run), **cpu_ms})
    print(f"burst intake: N streamed /v1/completions at once to the door of a CPU cluster (tiny-llama, "
          f"{args.policy}, {'the predictor, ' if args.predictor else ''}1 worker, max_tokens {args.max_tokens}); "
          f"{os.cpu_count()} cores; times in s")
    print_table(results)
    print("  CPU a request, whole burst (ms): " + ", ".join(
        f"{r['run']} door {r['http_cpu_ms']:.2f} scheduler {r['scheduler_cpu_ms']:.2f}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] == r["n"] for r in results) else 1


def print_table(results: list[dict]) -> None:
    print(f"  {'run':>9}{'ok':>5}{'send':>7}{'door':>7}{'queue 1st':>10}{'queue spread':>13}{'ms/req':>8}"
          f"{'inv door':>9}{'inv queue':>10}{'lag p50':>8}{'max':>7}{'ttft p50':>9}{'p90':>7}")
    for r in results:
        print(f"  {r['run']:>9}{r['ok']:>5}{r['send_spread']:7.3f}{r['door_spread']:7.3f}{r['queue_first']:10.3f}"
              f"{r['queue_spread']:13.3f}{r['per_request_ms']:8.2f}{r['inv_door']:9d}{r['inv_queue']:10d}"
              f"{r['lag_p50']:8.3f}{r['lag_max']:7.3f}{r['ttft_p50']:9.3f}{r['ttft_p90']:7.3f}")


if __name__ == "__main__":
    sys.exit(main())
