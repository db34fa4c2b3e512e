"""Many concurrent streaming HTTP clients against the CPU cluster: all complete, no token lost or
repeated, and the door's memory stays flat from wave to wave.

    python bench/http_concurrency.py [--clients 200] [--waves 5] [--tokens 32]

`alise up`'s processes (tiny-llama, random weights, one worker taking up to 256 sequences a
step). Each wave opens ``--clients`` streamed /v1/completions at once over plain httpx (one
connection each), every one with ``return_token_ids`` and ``stream_options.include_usage``. A
client passes when it received exactly ``--tokens`` token ids, the scheduler's usage says the
same, the finish reason is "length" and the stream ended with [DONE]. The door's resident memory
(/proc) is sampled every 0.1 s: before each wave, its peak during the wave, and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

from alise.tools.lab.local_cluster import cpu_cluster, rss_mib
from alise.worker.config import WorkerConfig


async def one_client(base_url: str, i: int, tokens: int) -> str:
    """"" when the stream was complete and exact, else what was wrong."""
    import httpx

    body = {"prompt": f"client {i} says hello", "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids, usage, finish, done = [], None, None, False
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    return f"HTTP {reply.status_code}"
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        usage = event.get("usage") or usage
                        for choice in event["choices"]:
                            ids += choice["token_ids"]
                            finish = choice["finish_reason"] or finish
    except Exception as exc:  # reported per client
        return f"{type(exc).__name__}: {exc}"
    if not done or finish != "length" or len(ids) != tokens or usage["completion_tokens"] != tokens:
        return f"{len(ids)} ids, usage {usage and usage['completion_tokens']}, finish {finish}, done {done}"
    return ""


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def wave(base_url: str, clients: int, tokens: int) -> list[str]:
    return await asyncio.gather(*(one_client(base_url, i, tokens) for i in range(clients)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--waves", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    rows, failures = [], []
    with cpu_cluster(worker=WorkerConfig(max_num_seqs=256)) as (cluster, _, base_url):
        pid = cluster.procs["http"].pid
        asyncio.run(wave(base_url, 4, 4))  # first requests: the model lookup, connections
        for w in range(args.waves):
            before = rss_mib(pid)
            start = time.monotonic()
            with RssSampler(pid) as sampler:
                errors = asyncio.run(wave(base_url, args.clients, args.tokens))
            elapsed = time.monotonic() - start
            time.sleep(1.0)
            rows.append((w + 1, sum(1 for e in errors if not e), elapsed, before, sampler.peak, rss_mib(pid),
                         os.getloadavg()[0]))
            failures += [e for e in errors if e]
    print(f"{args.clients} concurrent streaming HTTP clients x {args.tokens} tokens, {args.waves} waves, "
          f"CPU cluster of `alise up` (tiny-llama, random weights, 1 worker); {os.cpu_count()} cores")
    print(f"  {'wave':>4}{'complete':>10}{'seconds':>9}{'door RSS before':>17}{'peak':>8}"
          f"{'after (MiB)':>13}{'load':>6}")
    for w, ok, elapsed, before, peak, after, load in rows:
        print(f"  {w:>4}{f'{ok}/{args.clients}':>10}{elapsed:9.1f}{before:17.1f}{peak:8.1f}{after:13.1f}{load:6.1f}")
    if failures:
        print(f"  {len(failures)} clients failed, e.g. {failures[:3]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
