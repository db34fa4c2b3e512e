"""Load on the HTTP door for bench/soak.py: idle connections held open the whole time, and
bursts of huge text prompts, each of which must be refused at once.

The idle connections are bench/slowloris.py's attacker (a process of its own, its open-file
limit raised): ``connections`` sockets from ``addresses`` loopback addresses that send nothing,
each opened again 1 s after the door closes it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import httpx
from slowloris import attacker


class IdleConnections:
    """Started on construction; :meth:`stop` returns the per-second counts of open ones."""

    def __init__(self, port: int, connections: int, addresses: int = 100, reopen_s: float = 1.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop, self._samples = ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=attacker, args=(port, connections, addresses, reopen_s, self._stop,
                                                        self._samples), daemon=True)
        self._proc.start()

    def stop(self) -> list[int]:
        self._stop.set()
        counts = self._samples.get(timeout=120)
        self._proc.join(60)
        return counts


def huge_body(num_chars: int) -> bytes:
    text = ("the quick brown fox jumps over the lazy dog " * (num_chars // 44 + 1))[:num_chars]
    return json.dumps({"prompt": text, "max_tokens": 4}).encode()


async def huge_prompt_burst(base_url: str, n: int, body: bytes, tally: dict) -> None:
    """``n`` huge completions at once, each on a connection of its own; the time each took to
    be answered (ms) and its status go to ``tally["huge"]``."""

    async def one() -> tuple[float, str]:
        async with httpx.AsyncClient(timeout=60) as http:
            sent = time.monotonic()
            try:
                reply = await http.post(f"{base_url}/v1/completions", content=body,
                                        headers={"content-type": "application/json"})
                status = str(reply.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return 1e3 * (time.monotonic() - sent), status

    tally.setdefault("huge", []).extend(await asyncio.gather(*(one() for _ in range(n))))
