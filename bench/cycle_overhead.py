"""The scheduler's share of a plan/report cycle with many concurrent streams, on this CPU.

    .venv/bin/python bench/cycle_overhead.py [--streams 64] [--tokens 64] [--rounds 3]

In-process scheduler and one worker (the embedded tiny-llama, random weights) over loopback
gRPC; ``--streams`` concurrent Generate calls of ``--tokens`` tokens each. Alternates, round
by round, the engine's two orders of work after a report: next plans first, then the tokens to
the streams (``tokens_after_plans``, the default), or tokens first. Prints, per order, the
cycle split the scheduler measures (alise.scheduler.worker_link.CycleTimes) and the wall time.
Ratios within one run are what count on a shared CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from alise.client import AsyncClient
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.worker_link import CycleTimes
from alise.scheduler.service import start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scheduler = await start_scheduler(SchedulerConfig(address="127.0.0.1:0"))
    address = f"127.0.0.1:{scheduler.port}"
    worker = Worker(WorkerConfig(scheduler_address=f"127.0.0.1:{scheduler.worker_port}", health_address="", worker_id="w0",
                                 max_num_seqs=args.streams, num_device_blocks=4096))
    await worker.load()
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 30)
    engine = scheduler.engine
    link = engine.links["w0"]
    results: dict[bool, list] = {True: [], False: []}
    async with AsyncClient(address) as client:
        await client.complete("warm up", max_tokens=4, ignore_eos=True)
        for _ in range(args.rounds):
            for after in (True, False):
                engine.tokens_after_plans = after
                link.times = CycleTimes()
                start = time.perf_counter()
                await asyncio.gather(*(client.complete(f"stream {i}", max_tokens=args.tokens, ignore_eos=True)
                                       for i in range(args.streams)))
                results[after].append((time.perf_counter() - start, link.times))
    await worker.stop()
    await asyncio.wait_for(task, 10)
    worker.close()
    await scheduler.stop(grace_s=0.1)
    print(f"{args.streams} streams x {args.tokens} tokens, tiny-llama on CPU, {args.rounds} rounds each; "
          "per cycle, median over rounds (ms)")
    print(f"{'order':24s} {'wall s':>8s} {'cycle':>7s} {'device':>7s} {'worker+net':>10s} {'scheduler':>9s} {'planning':>8s}")
    for after, label in ((True, "plans, then tokens"), (False, "tokens, then plans")):
        rows = results[after]

        def med(f):
            return statistics.median(f(t) for _, t in rows)
        per = lambda x: lambda t: 1e3 * x(t) / max(t.cycles, 1)  # noqa: E731
        print(f"{label:24s} {statistics.median(w for w, _ in rows):8.2f} "
              f"{med(per(lambda t: t.round_trip_s + t.turnaround_s)):7.2f} {med(per(lambda t: t.device_s)):7.2f} "
              f"{med(per(lambda t: t.round_trip_s - t.device_s)):10.2f} {med(per(lambda t: t.turnaround_s)):9.2f} "
              f"{med(per(lambda t: t.schedule_s)):8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
