"""Soak: the `chat` trace against `alise up` on this CPU while its services are killed.

    python bench/soak.py [--duration 600] [--kill-every 80] [--out soak.json]

Starts `alise up` (its defaults: the predictor, tiny-llama workers with random weights, every
port a free one on loopback, an internal secret), sends the `chat` trace at ``--rate`` through
the SDK, and every ``--kill-every`` seconds SIGKILLs one service, in turn: a worker, the
predictor, the scheduler, another worker, the predictor, the scheduler. `alise up` restarts
each; the SDK resumes every stream the scheduler's death broke, and requests sent while no
scheduler answers wait for it (``wait_for_ready``). Checked and printed:

* every request: its chunk indices contiguous from 0 and its token count what it asked for
  (zero lost requests, zero duplicated or missing tokens);
* no worker process lost: every service serving at the end, two workers attached;
* the predictor's history: its observation count read just before each kill, and after the
  restart (nothing it had taken is lost), and at the end against the start plus one
  observation per completed request (each finished job observed once, adopted ones too);
* resident memory of every process (each service's pid, and `alise up` itself), its first
  sample ``--warmup`` seconds into its life against its last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc
from alise.client import AliseError, AsyncClient
from alise.common.security import SECRET_HEADER
from alise.sim.trace import build_trace, load_pairs, rescale, workload_path
from alise.v1 import predictor_pb2, predictor_pb2_grpc
from upcluster import UpCluster

TURNS = ("worker-0", "predictor", "scheduler", "worker-1", "predictor", "scheduler")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def wait_serving(up: UpCluster, name: str, old_pid: int | None, timeout_s: float = 120) -> float:
    """Seconds until ``name`` serves again under a pid other than ``old_pid``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        s = up.services()[name]
        if s["state"] == "serving" and s["pid"] and s["pid"] != old_pid:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} did not come back within {timeout_s} s")


def history_observations(address: str, secret: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = predictor_pb2_grpc.PredictorServiceStub(channel).GetStats(
            predictor_pb2.GetStatsRequest(), timeout=10, metadata=((SECRET_HEADER, secret),))
    return stats.history_observations


async def run_request(client: AsyncClient, req, max_tokens: int, tally: dict) -> None:
    tokens = expected_index = 0
    try:
        async for chunk in client.generate(req.prompt, max_tokens=max_tokens, ignore_eos=True,
                                           timeout_s=900, wait_for_ready=True):
            if chunk.index != expected_index:
                tally["index_errors"] += 1
            expected_index = chunk.index + len(chunk.token_ids)
            tokens += len(chunk.token_ids)
    except AliseError as exc:
        tally["errors"].append(f"{exc.code.name}: {exc.details[:200]}")
        return
    tally["complete" if tokens == max_tokens else "short"] += 1


async def chaos(up: UpCluster, secret: str, kill_every_s: float, start: float, stop_at: float,
                events: list, history: list) -> None:
    for k, name in enumerate(TURNS):
        at = start + (k + 1) * kill_every_s
        if at > stop_at:
            break
        await asyncio.sleep(max(at - time.monotonic(), 0.0))
        services = up.services()
        pid = services[name]["pid"]
        predictor = services["predictor"]["listen"]["grpc"]
        before = await asyncio.to_thread(history_observations, predictor, secret) if name == "predictor" else None
        os.kill(pid, signal.SIGKILL)
        back_s = await wait_serving(up, name, pid)
        event = {"t_s": round(at - start, 1), "fault": f"SIGKILL {name} (pid {pid})", "serving_again_s": round(back_s, 1)}
        if before is not None:
            after = await asyncio.to_thread(history_observations, up.services()["predictor"]["listen"]["grpc"], secret)
            history.append((before, after))
            event["history_before_after"] = [before, after]
        events.append(event)
        print(f"  {event}", flush=True)


async def sample_rss(up: UpCluster, start: float, end: float, samples: dict) -> None:
    while time.monotonic() < end:
        procs = {"alise up": up.proc.pid}
        procs.update({f"{n} (pid {s['pid']})": s["pid"] for n, s in up.services().items() if s["pid"]})
        for label, pid in procs.items():
            kib = rss_kib(pid)
            if kib:
                samples.setdefault(label, []).append((time.monotonic() - start, kib))
        await asyncio.sleep(5.0)


async def main_async(args) -> dict:
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="alise-soak-"))
    secret = secrets.token_hex(16)
    up = await asyncio.to_thread(
        UpCluster, "--http-address", "", "--policy", args.policy, "--worker-arg=--max-num-seqs",
        "--worker-arg=32", workers=2, state_dir=root / "state", env={**os.environ, "ALISE_INTERNAL_SECRET": secret})
    try:
        address = up.address
        predictor = up.services()["predictor"]["listen"]["grpc"]
        trace = rescale(build_trace(load_pairs(workload_path("chat")), num=args.num, rate=1.0, seed=3), args.rate)
        trace = [r for r in trace if r.arrival_s < args.duration - args.tail]
        tally = {"sent": 0, "complete": 0, "short": 0, "index_errors": 0, "errors": []}
        events: list = []
        history: list = []
        samples: dict = {}
        async with AsyncClient(address) as client:
            await client.complete("warm up", max_tokens=2, ignore_eos=True)
            await asyncio.sleep(2.0)
            history_start = history_observations(predictor, secret)
            start = time.monotonic()
            end = start + args.duration
            background = [asyncio.create_task(chaos(up, secret, args.kill_every, start, end - args.tail,
                                                    events, history)),
                          asyncio.create_task(sample_rss(up, start, end, samples))]
            tasks = []
            for req in trace:
                await asyncio.sleep(max(start + req.arrival_s - time.monotonic(), 0.0))
                tally["sent"] += 1
                tasks.append(asyncio.create_task(run_request(client, req, min(req.output_tokens, args.max_tokens), tally)))
            await asyncio.gather(*tasks)
            await background[0]
            # Memory is sampled for the whole duration, traffic or not.
            await asyncio.sleep(max(end - time.monotonic(), 0.0))
            background[1].cancel()
            status = await client.status()
        elapsed = time.monotonic() - start
        predictor = up.services()["predictor"]["listen"]["grpc"]
        deadline = time.monotonic() + 30
        expected_end = history_start + tally["complete"] + tally["short"]
        while (history_end := history_observations(predictor, secret)) < expected_end and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        services = {n: s["state"] for n, s in up.services().items()}
    finally:
        code = up.stop()
    rss = {}
    for label, points in samples.items():
        # Each process from ``--warmup`` seconds after its own first sample (a restarted one
        # is still loading its model at first).
        warm = [kib for t, kib in points if t >= points[0][0] + args.warmup]
        if len(warm) >= 2:
            rss[label] = {"samples": len(warm), "first_kib": warm[0], "last_kib": warm[-1],
                          "growth": round(warm[-1] / warm[0] - 1, 4)}
    return {"duration_s": round(elapsed, 1), "requests": tally["sent"], "completed": tally["complete"],
            "short": tally["short"], "failed": len(tally["errors"]), "index_errors": tally["index_errors"],
            "errors": tally["errors"][:10], "faults": events, "history_start": history_start,
            "history_end": history_end, "history_expected_end": expected_end,
            "history_around_predictor_kills": history, "services_at_end": services,
            "workers_at_end": sorted(w["worker_id"] for w in status.workers), "rss": rss,
            "alise_up_exit_code": code, "rate": args.rate, "max_tokens": args.max_tokens, "dir": str(root)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--tail", type=float, default=60.0, help="no new requests in the last seconds")
    p.add_argument("--rate", type=float, default=0.5, help="requests per second")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=96, help="cap on a request's output tokens")
    p.add_argument("--policy", default="alise")
    p.add_argument("--kill-every", type=float, default=80.0)
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--out-dir", default="", help="state, logs (default: a temporary directory)")
    p.add_argument("--out", default=None, help="the result as JSON")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'fault':<34}{'at s':>7}{'serving again s':>17}  predictor history before -> after")
    for e in result["faults"]:
        h = e.get("history_before_after")
        print(f"{e['fault']:<34}{e['t_s']:>7}{e['serving_again_s']:>17}  {f'{h[0]} -> {h[1]}' if h else ''}")
    print(f"\n{'process':<28}{'first KiB':>11}{'last KiB':>11}{'growth':>9}  ({args.warmup:g} s into each one's life)")
    for label, r in result["rss"].items():
        print(f"{label:<28}{r['first_kib']:>11}{r['last_kib']:>11}{r['growth']:>+9.1%}")
    ok = (result["failed"] == 0 and result["short"] == 0 and result["index_errors"] == 0
          and result["history_end"] == result["history_expected_end"]
          and all(after >= before for before, after in result["history_around_predictor_kills"])
          and len(result["workers_at_end"]) == 2 and set(result["services_at_end"].values()) == {"serving"})
    print(f"\nsoak {result['duration_s']} s: {result['requests']} requests, {result['completed']} complete, "
          f"{result['short']} short, {result['failed']} failed, {result['index_errors']} index errors "
          f"(dup/missing tokens); {len(result['faults'])} faults; predictor history "
          f"{result['history_start']} -> {result['history_end']} (expected {result['history_expected_end']}); "
          f"workers at end {result['workers_at_end']}; services {result['services_at_end']}; "
          f"alise up exit {result['alise_up_exit_code']}: {'OK' if ok else 'FAILED'}")
    for err in result["errors"]:
        print("  error:", err)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
