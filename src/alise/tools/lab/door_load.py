"""Load on the HTTP door from outside it, for the benchmarks: idle connections held open
(slowloris), and bursts of huge text prompts, each of which must be refused at once.

The idle connections come from a process of their own (its open-file limit raised): sockets
from ``addresses`` loopback addresses that send nothing, each opened again ``reopen_s`` after
the door closes it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
import time

import httpx


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def attacker(port: int, connections: int, addresses: int, reopen_s: float, stop, samples) -> None:
    """Holds ``connections`` idle connections to ``port`` from ``addresses`` source addresses
    until ``stop`` is set; puts its per-second counts of open connections on ``samples``."""
    raise_open_files()

    async def hold(i: int, gate: asyncio.Semaphore, open_now: list[int]) -> None:
        source = "127.0.0.2" if addresses == 1 else f"127.0.1.{1 + i % addresses}"
        while not stop.is_set():
            try:
                async with gate:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(reopen_s)
                continue
            open_now[0] += 1
            try:
                while await reader.read(65536):  # what the door says before it closes
                    pass
            except OSError:
                pass
            finally:
                open_now[0] -= 1
                writer.close()
            await asyncio.sleep(reopen_s)

    async def main() -> None:
        gate, open_now, counts = asyncio.Semaphore(256), [0], []
        tasks = [asyncio.create_task(hold(i, gate, open_now)) for i in range(connections)]
        while not stop.is_set():
            await asyncio.sleep(1.0)
            counts.append(open_now[0])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        samples.put(counts)

    asyncio.run(main())


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
