"""Soak: the `chat` trace against a real CPU cluster while workers are killed and restarted.

Bounded in time and requests, loopback only. Every `--kill-every` seconds one worker gets
SIGKILL and is restarted at once; the predictor is restarted once (SIGTERM, then start).
Every request is checked: its chunk indices must be contiguous from 0 and its token count
must equal what it asked for (zero lost requests, zero duplicated or missing tokens).
Resident memory of the long-lived processes is sampled; growth is measured after warm-up.

    python bench/soak.py --duration 600 --out runs/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from alise.client import AliseError, AsyncClient
from alise.cluster.local import ClusterConfig, LocalCluster, is_serving, service_commands
from alise.sim.trace import build_trace, load_pairs, rescale, workload_path


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def run_request(client: AsyncClient, req, max_tokens: int, tally: dict) -> None:
    tokens = 0
    expected_index = 0
    try:
        async for chunk in client.generate(req.prompt, max_tokens=max_tokens, ignore_eos=True,
                                           oracle_output_tokens=max_tokens, timeout_s=900):
            if chunk.index != expected_index:
                tally["index_errors"] += 1
            expected_index = chunk.index + len(chunk.token_ids)
            tokens += len(chunk.token_ids)
    except AliseError as exc:
        tally["errors"].append(str(exc)[:200])
        return
    if tokens == max_tokens:
        tally["complete"] += 1
    else:
        tally["short"] += 1


async def chaos(cluster: LocalCluster, workers: list[str], kill_every_s: float,
                predictor_restart_at_s: float, start: float, end: float, events: list) -> None:
    turn = 0
    next_kill = start + kill_every_s
    predictor_done = "predictor" not in cluster.procs
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        if now >= next_kill:
            name = workers[turn % len(workers)]
            turn += 1
            os.kill(cluster.procs[name].pid, signal.SIGKILL)
            cluster.procs[name].wait()
            cluster.start_one(name)
            events.append((round(now - start, 1), f"SIGKILL {name}, restarted"))
            next_kill += kill_every_s
        if not predictor_done and now - start >= predictor_restart_at_s:
            proc = cluster.procs["predictor"]
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait)
            cluster.start_one("predictor")
            events.append((round(now - start, 1), f"predictor SIGTERM (exit {code}), restarted"))
            predictor_done = True


async def sample_rss(cluster: LocalCluster, names: list[str], start: float, end: float, samples: dict) -> None:
    while time.monotonic() < end:
        for name in names:
            kib = rss_kib(cluster.procs[name].pid)
            if kib:
                samples.setdefault(name, []).append((time.monotonic() - start, kib))
        await asyncio.sleep(5.0)


async def main_async(args) -> dict:
    state = Path(tempfile.mkdtemp(prefix="alise-soak-"))
    cfg = ClusterConfig(address=f"127.0.0.1:{args.port}", worker_address=f"127.0.0.1:{args.port + 1}",
                        num_workers=args.workers, policy=args.policy,
                        predictor_address=f"127.0.0.1:{args.port + 2}", state_dir=str(state),
                        worker_health_base_port=args.port + 10,
                        worker_args=("--max-num-seqs", "32", "--num-device-blocks", "2048"))
    cluster = LocalCluster(service_commands(cfg), log_dir=str(state / "logs"))
    cluster.start()
    await asyncio.to_thread(cluster.wait_healthy, 300)
    trace = rescale(build_trace(load_pairs(workload_path("chat")), num=args.num, rate=1.0, seed=3),
                    args.rate)
    trace = [r for r in trace if r.arrival_s < args.duration - args.tail]
    tally = {"sent": 0, "complete": 0, "short": 0, "index_errors": 0, "errors": []}
    events: list = []
    samples: dict = {}
    start = time.monotonic()
    end = start + args.duration
    workers = [n for n in cluster.commands if n.startswith("worker")]
    background = [asyncio.create_task(chaos(cluster, workers, args.kill_every, args.predictor_restart_at,
                                            start, end - args.tail, events)),
                  asyncio.create_task(sample_rss(cluster, ["scheduler"], start, end, samples))]
    async with AsyncClient(cfg.address) as client:
        tasks = []
        for req in trace:
            delay = start + req.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tally["sent"] += 1
            tasks.append(asyncio.create_task(run_request(client, req, min(req.output_tokens, args.max_tokens), tally)))
        await asyncio.gather(*tasks)
    # Keep sampling memory (and injecting faults) for the whole duration, traffic or not.
    await asyncio.sleep(max(end - time.monotonic(), 0.0))
    for task in background:
        task.cancel()
    elapsed = time.monotonic() - start
    predictor_ok = is_serving(cfg.predictor_address)
    async with AsyncClient(cfg.address) as client:
        status = await client.status()
    codes = cluster.stop()
    rss = {}
    for name, points in samples.items():
        warm = [kib for t, kib in points if t >= args.warmup]
        if len(warm) >= 2:
            base = statistics.median(warm[: max(len(warm) // 5, 1)])
            rss[name] = {"after_warmup_kib": base, "end_kib": warm[-1], "growth": warm[-1] / base - 1}
    return {"duration_s": round(elapsed, 1), "requests": tally["sent"], "completed": tally["complete"],
            "lost_or_failed": len(tally["errors"]) + tally["short"], "index_errors": tally["index_errors"],
            "errors": tally["errors"][:10], "events": events, "rss": rss, "exit_codes": codes,
            "predictor_serving_at_end": predictor_ok, "predictor_state_at_end": status.predictor_state,
            "workers_at_end": [w["worker_id"] for w in status.workers], "rate": args.rate,
            "max_tokens": args.max_tokens, "state_dir": str(state)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--tail", type=float, default=60.0, help="no new requests in the last seconds")
    p.add_argument("--rate", type=float, default=0.5, help="requests per second")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=96, help="cap on a request's output tokens")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--policy", default="alise")
    p.add_argument("--kill-every", type=float, default=120.0)
    p.add_argument("--predictor-restart-at", type=float, default=300.0)
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--port", type=int, default=52051)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))
    print(f"\nsoak: {result['requests']} requests, {result['completed']} complete, "
          f"{result['lost_or_failed']} lost or failed, {result['index_errors']} index errors (dup/missing "
          f"tokens), {len(result['events'])} faults injected; scheduler RSS growth after warm-up "
          f"{result['rss'].get('scheduler', {}).get('growth', float('nan')):+.1%}")
    ok = result["lost_or_failed"] == 0 and result["index_errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
