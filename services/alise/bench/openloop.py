"""Open-loop replay of a trace against a live cluster, through the SDK.

Each request is sent at its arrival time whatever the state of the others (open loop: a slow
server does not slow the offered load down), with ``ignore_eos=True`` and
``oracle_output_tokens=output_tokens``, so it generates exactly the trace's length (the
scheduler ends a job of known length there). ``max_tokens`` is the same generous cap for every
request (``DEFAULT_MAX_TOKENS``, the simulator's): the scheduler caps each job's remaining-time
estimate at ``max_tokens`` minus what it has generated, so sending the true length there would
hand the ``alise`` policy the oracle's knowledge. Per request: TTFT (first chunk with tokens), TPOT (mean time per
output token after the first), end-to-end latency and normalized latency (end-to-end over
output tokens), measured on the client's monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from alise.sim.simulator import SimConfig
from alise.sim.trace import TraceRequest

#: ``max_tokens`` of every replayed request: the simulator's cap, not the true length.
DEFAULT_MAX_TOKENS = SimConfig.max_tokens


@dataclass
class RequestResult:
    index: int
    id: str
    prompt_tokens: int
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


async def _one(client, i: int, r: TraceRequest, start: float, timeout_s: float,
               request_prefix: str, max_tokens: int) -> RequestResult:
    res = RequestResult(i, r.id, r.prompt_tokens, r.output_tokens, r.arrival_s)
    await asyncio.sleep(max(0.0, start + r.arrival_s - time.monotonic()))
    t0 = time.monotonic()
    res.sent_s = t0 - start
    first = None
    try:
        async for chunk in client.generate(r.prompt, max_tokens=max_tokens, ignore_eos=True,
                                           oracle_output_tokens=r.output_tokens,
                                           request_id=f"{request_prefix}{i}", timeout_s=timeout_s):
            if chunk.token_ids and first is None:
                first = time.monotonic()
            res.num_tokens += len(chunk.token_ids)
            if chunk.finish_reason:
                res.finish_reason = str(chunk.finish_reason)
    except Exception as exc:  # noqa: BLE001 - recorded per request, the run goes on
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    end = time.monotonic()
    res.e2e_s = end - t0
    if first is not None:
        res.ttft_s = first - t0
        if res.num_tokens > 1:
            res.tpot_s = (end - first) / (res.num_tokens - 1)
    res.normalized_latency_s = res.e2e_s / max(res.num_tokens, 1)
    return res


async def run_bench(requests: Sequence[TraceRequest], address: str, *, timeout_s: float = 600.0,
                    request_prefix: str = "bench-",
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> list[RequestResult]:
    """Replays ``requests`` open-loop; ``max_tokens`` is every request's cap (raised to a
    request's trace length where that is longer, or the job could not run to it)."""
    from alise.client import AsyncClient

    async with AsyncClient(address) as client:
        start = time.monotonic() + 0.05
        tasks = [asyncio.create_task(_one(client, i, r, start, timeout_s, request_prefix,
                                                    max(max_tokens, r.output_tokens)))
                 for i, r in enumerate(requests)]
        return list(await asyncio.gather(*tasks))


def write_results(results: Sequence[RequestResult], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summarize(results: Sequence[RequestResult]) -> dict:
    ok = [r for r in results if not r.error]
    span = max((r.sent_s + r.e2e_s for r in ok), default=0.0)
    out = dict(num_requests=len(results), num_ok=len(ok), num_failed=len(results) - len(ok),
               duration_s=span,
               throughput_req_s=len(ok) / span if span > 0 else 0.0,
               throughput_tok_s=sum(r.num_tokens for r in ok) / span if span > 0 else 0.0)
    for name in ("ttft_s", "tpot_s", "e2e_s", "normalized_latency_s"):
        vals = [getattr(r, name) for r in ok if not math.isnan(getattr(r, name))]
        out[name] = dict(mean=statistics.fmean(vals) if vals else math.nan,
                         p50=_pct(vals, 0.5), p90=_pct(vals, 0.9), p99=_pct(vals, 0.99))
    longest = sorted(ok, key=lambda r: r.output_tokens)[-max(1, math.ceil(0.05 * len(ok))):] if ok else []
    out["p99_longest5_normalized_latency_s"] = _pct([r.normalized_latency_s for r in longest], 0.99)
    return out


def format_summary(s: dict, title: str = "bench") -> str:
    lines = [f"{title}: {s['num_ok']}/{s['num_requests']} ok, {s['duration_s']:.1f} s, "
             f"{s['throughput_req_s']:.2f} req/s, {s['throughput_tok_s']:.1f} tok/s",
             f"  {'metric':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name, label in (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("e2e_s", "end-to-end (s)"),
                        ("normalized_latency_s", "normalized (s/token)")):
        m = s[name]
        lines.append(f"  {label:<22}" + "".join(f"{m[k]:10.4f}" for k in ("mean", "p50", "p90", "p99")))
    lines.append(f"  p99 normalized latency of the longest 5 %: {s['p99_longest5_normalized_latency_s']:.4f} s/token")
    return "\n".join(lines)
