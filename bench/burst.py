"""Burst: N requests at once against a real CPU cluster (`alise up`), loopback only.

Every request is tallied by how it ended: completed, RESOURCE_EXHAUSTED with or without a
retry-after hint, CANCELLED, or another status. A separate process probes the scheduler's
grpc.health.v1 every 100 ms throughout (1 s deadline) and reports how long each answer took.
Optionally a worker is killed (SIGKILL) in the middle of the burst, and the time until its
restart is attached to the scheduler again is reported (a worker reconnecting under a flood).

    python bench/burst.py --num 6000
    python bench/burst.py --num 6000 --kill-worker --out /tmp/burst.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from alise.client import AliseError, AsyncClient
from alise.tools.lab.upcluster import UpCluster, probe_health


async def one_request(client: AsyncClient, i: int, max_tokens: int, tally: Counter, errors: list) -> None:
    try:
        out = await client.complete(f"burst request {i}", max_tokens=max_tokens, ignore_eos=True,
                                    timeout_s=900)
        tally["completed" if len(out.token_ids) == max_tokens else "short"] += 1
    except AliseError as exc:
        name = exc.code.name
        if name == "RESOURCE_EXHAUSTED":
            name += " with retry-after" if exc.retry_after_s else " WITHOUT retry-after"
        tally[name] += 1
        if len(errors) < 5 or name not in {e.split(":")[0] for e in errors}:
            errors.append(f"{name}: {exc.details[:160]}")


def wait_attached(address: str, worker_id: str, timeout_s: float, killed_s: float) -> float | None:
    """Seconds from the kill until ``worker_id`` is attached on a connection made after it."""
    from alise.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(address) as client:
        while time.monotonic() < deadline:
            try:
                workers = client.status(timeout_s=2.0).workers
            except AliseError:
                workers = []
            since_kill = time.monotonic() - killed_s
            if any(w["worker_id"] == worker_id and w["connected_s"] < since_kill for w in workers):
                return since_kill
            time.sleep(0.2)
    return None


async def burst(address: str, args, worker_pid: int) -> dict:
    tally: Counter = Counter()
    errors: list[str] = []
    clients = [AsyncClient(address) for _ in range(args.channels)]
    started = time.monotonic()
    tasks = [asyncio.create_task(one_request(clients[i % len(clients)], i, args.max_tokens, tally, errors))
             for i in range(args.num)]
    reconnect = None
    if args.kill_worker:
        await asyncio.sleep(args.kill_after)
        os.kill(worker_pid, signal.SIGKILL)
        killed = time.monotonic()
        reconnect = asyncio.ensure_future(asyncio.to_thread(wait_attached, address, "worker-0", 300, killed))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    reattach_s = await reconnect if reconnect is not None else None
    for client in clients:
        await client.close()
    return dict(tally=dict(tally), errors=errors, elapsed_s=elapsed, worker_reattach_s=reattach_s)


def summarize_health(probes: list) -> dict:
    answered = [lat for _, lat, status in probes if lat is not None and status == "SERVING"]
    failed = Counter(status for _, lat, status in probes if lat is None or status != "SERVING")
    return dict(probes=len(probes), serving=len(answered), failed=dict(failed),
                p50_ms=1e3 * statistics.median(answered) if answered else None,
                max_ms=1e3 * max(answered) if answered else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=6000, help="requests sent at once")
    p.add_argument("--max-tokens", type=int, default=2, help="output tokens of each request")
    p.add_argument("--channels", type=int, default=32, help="client channels the requests spread over")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--kill-worker", action="store_true", help="SIGKILL worker-0 during the burst")
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds into the burst to kill it")
    p.add_argument("--up-arg", action="append", default=[], help="extra argument for alise up, repeatable")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    up = UpCluster(*args.up_arg, workers=args.workers)
    address = up.address
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=(address, stop, results))
    try:
        prober.start()
        time.sleep(1.0)
        result = asyncio.run(burst(address, args, up.pid("worker-0")))
        time.sleep(1.0)
        stop.set()
        result["health"] = summarize_health(results.get(timeout=30))
        prober.join(10)
    finally:
        up.stop()
    result.update(num=args.num, max_tokens=args.max_tokens, channels=args.channels, workers=args.workers,
                  state_dir=str(up.state_dir))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"burst of {args.num} requests ({args.max_tokens} tokens each, {args.channels} channels, "
          f"{args.workers} worker(s)), {result['elapsed_s']:.1f} s until the last answer")
    print(f"{'outcome':<40}{'requests':>10}")
    for name, count in sorted(result["tally"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<40}{count:>10}")
    h = result["health"]
    print(f"health probes: {h['probes']} sent, {h['serving']} SERVING, failed {h['failed'] or 'none'}; "
          f"latency p50 {h['p50_ms'] or float('nan'):.1f} ms, max {h['max_ms'] or float('nan'):.1f} ms")
    if args.kill_worker:
        again = result["worker_reattach_s"]
        print(f"worker-0 killed (SIGKILL) {args.kill_after:g} s into the burst; restarted by alise up, attached "
              f"again {'never' if again is None else f'{again:.1f} s'} after the kill")
    for line in result["errors"]:
        print("  e.g.", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
