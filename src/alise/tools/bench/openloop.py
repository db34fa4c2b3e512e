"""Open-loop replay of a trace against a live server, through a backend (``alise.tools.bench.backends``).

Each request is sent at its arrival time whatever the state of the others (open loop: a slow
server does not slow the offered load down); ``max_concurrency`` caps the requests in flight,
and a request past the cap waits for a slot (its clock starts when it is sent). A
conversation's later turns are the exception (``alise.tools.trace.Releases``): turn k+1 is sent
its think time after turn k's stream ended (or failed), as a chat client would, so those
arrivals follow the server's speed.

Lengths: ``max_tokens`` is a cap (``DEFAULT_MAX_TOKENS``, the simulator's, unless given): every
request generates min(cap, its trace length) tokens (``ignore_eos``), in both modes, as the
simulator's jobs do. With ``lengths="oracle"`` every request sends the common cap as its
``max_tokens`` and that target as ``oracle_output_tokens`` (never above the cap): the scheduler
caps each job's remaining-time estimate at ``max_tokens`` minus what it has generated, so
sending the true length there would hand the ``alise`` policy the oracle's knowledge.
``lengths="max-tokens"`` sends ``max_tokens`` = the target instead, as vLLM's benchmark does,
for servers that lack the oracle field. Per-request timings are taken on the client's monotonic
clock (``alise.tools.bench.metrics`` defines them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alise.tools.bench.backends import GrpcBackend, Send, StreamEnd
from alise.tools.bench.metrics import format_summary, summarize  # noqa: F401 - the run's figures
from alise.tools.sim.progress import ProgressLine
from alise.tools.sim.simulator import SimConfig
from alise.tools.trace import Releases, TraceRequest

#: The cap on every replayed request's output: the simulator's, not the true length.
DEFAULT_MAX_TOKENS = SimConfig.max_tokens
LENGTH_MODES = ("oracle", "max-tokens")


@dataclass
class RequestResult:
    index: int
    id: str
    prompt_tokens: int
    #: The trace's length (the request generates at most its ``max_tokens`` cap of it).
    output_tokens: int
    arrival_s: float
    sent_s: float = 0.0
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    normalized_latency_s: float = math.nan
    num_tokens: int = 0
    finish_reason: str = ""
    error: str = ""
    #: Gaps between successive chunks with output (seconds).
    itl_s: list[float] = field(default_factory=list)


def request_send(r: TraceRequest, request_id: str, *, lengths: str, max_tokens: int,
                 timeout_s: float) -> Send:
    """What the backend sends for ``r``: it is to generate min(``max_tokens``, its trace length)."""
    target = min(max_tokens, r.output_tokens)
    if lengths == "oracle":
        return Send(r.prompt, max_tokens, target, request_id, timeout_s)
    return Send(r.prompt, target, 0, request_id, timeout_s)


@dataclass
class _Tally:
    """Requests sent, ended and failed so far (what the progress line shows)."""

    num_requests: int
    num_sent: int = 0
    num_done: int = 0
    num_failed: int = 0

    def line(self, elapsed_s: float) -> str:
        rate = self.num_done / elapsed_s if elapsed_s > 0 else 0.0
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        return (f"bench: {self.num_done}/{self.num_requests} done, {self.num_sent - self.num_done} in flight"
                f"{failed} | {rate:.2f} req/s | {elapsed_s:.1f} s")

    def ended(self, res: RequestResult) -> RequestResult:
        self.num_done += 1
        self.num_failed += bool(res.error)
        return res


async def _one(backend, i: int, r: TraceRequest, released_s: float, start: float, send: Send, gate,
               tally: _Tally) -> RequestResult:
    res = RequestResult(i, r.id, r.prompt_tokens, r.output_tokens, released_s)
    async with gate:
        tally.num_sent += 1
        return tally.ended(await _measure(backend, send, start, res))


async def _measure(backend, send: Send, start: float, res: RequestResult) -> RequestResult:
    t0 = time.monotonic()
    res.sent_s = t0 - start
    first = last = None
    try:
        async for event in backend.stream(send):
            now = time.monotonic()
            if isinstance(event, StreamEnd):
                res.num_tokens, res.finish_reason = event.num_tokens, event.finish_reason
                break
            if first is None:
                first = now
            else:
                res.itl_s.append(now - last)
            last = now
    except Exception as exc:  # BenchError, an SDK error, a broken stream: recorded per request
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    end = last if last is not None else time.monotonic()
    res.e2e_s = end - t0
    if first is not None:
        res.ttft_s = first - t0
        if res.num_tokens > 1:
            res.tpot_s = (end - first) / (res.num_tokens - 1)
    res.normalized_latency_s = res.e2e_s / max(res.num_tokens, 1)
    return res


async def _show(progress: ProgressLine, tally: _Tally, start: float) -> None:
    while True:
        progress.update(tally.line(max(time.monotonic() - start, 0.0)))  # the first draw precedes start
        await asyncio.sleep(progress.min_interval_s)


async def _release(requests: Sequence[TraceRequest], start: float, launch) -> list[asyncio.Task]:
    """Calls ``launch(index, release time)`` for each request when :class:`Releases` says
    (times from ``start`` on the monotonic clock); a launched task's end releases its
    conversation's next turn. Returns the tasks once every request is launched."""
    releases = Releases(requests)
    changed = asyncio.Event()
    tasks = []

    def ended(i: int, _task) -> None:
        releases.finished(i, time.monotonic() - start)
        changed.set()

    try:
        while releases:
            due = releases.next_s()
            try:
                timeout = None if due is None else max(0.0, start + due - time.monotonic())
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                pass
            changed.clear()
            for i, released_s in releases.pop_due(time.monotonic() - start):
                task = asyncio.create_task(launch(i, released_s))
                task.add_done_callback(lambda t, i=i: ended(i, t))
                tasks.append(task)
    except BaseException:  # cancelled: so are the requests in flight
        for task in tasks:
            task.cancel()
        raise
    return tasks


async def run_bench(requests: Sequence[TraceRequest], target, *, timeout_s: float = 600.0,
                    request_prefix: str = "bench-", max_tokens: int = DEFAULT_MAX_TOKENS,
                    lengths: str = "oracle", max_concurrency: int | None = None,
                    progress: ProgressLine | None = None) -> list[RequestResult]:
    """Replays ``requests`` open-loop against ``target``: a backend, or a scheduler's gRPC
    address. Each request generates min(``max_tokens``, its trace length) tokens (module doc).
    ``progress``: where to show requests done, in flight and failed as the run goes, and one
    line when it ends."""
    if lengths not in LENGTH_MODES:
        raise ValueError(f"lengths must be one of {', '.join(LENGTH_MODES)}, got {lengths!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    backend = GrpcBackend(target) if isinstance(target, str) else target
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    tally = _Tally(len(requests))
    async with backend:
        start = time.monotonic() + 0.05

        def launch(i: int, released_s: float):
            r = requests[i]
            return _one(backend, i, r, released_s, start, request_send(
                r, f"{request_prefix}{i}", lengths=lengths, max_tokens=max_tokens, timeout_s=timeout_s),
                gate, tally)

        shown = asyncio.create_task(_show(progress, tally, start)) if progress and progress.is_live else None
        try:
            tasks = await _release(requests, start, launch)
            results = sorted(await asyncio.gather(*tasks), key=lambda res: res.index)
        finally:
            if shown is not None:
                shown.cancel()
    if progress:
        elapsed = max(time.monotonic() - start, 1e-9)
        progress.phase(f"bench: {tally.num_done} requests in {elapsed:.1f} s "
                       f"({tally.num_done / elapsed:.2f} req/s), {tally.num_failed} failed")
    return results


def write_results(results: Sequence[RequestResult], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")


def read_results(rows: Sequence[dict]) -> list[RequestResult]:
    return [RequestResult(**row) for row in rows]
