"""What the HTTP door adds to TTFT and to the gap between tokens, against the gRPC door, in one run.

    python bench/http_overhead.py [--pairs 120] [--tokens 32] [--predictor]

The CPU cluster of `alise up` (tiny-llama, random weights; scheduler, one worker and the door as
real processes). Each round sends one request through the gRPC door (the SDK) and one through the
HTTP door (streamed /v1/completions with return_token_ids, so each SSE event is one scheduler
message) at the same instant, same prompt and length; which goes first alternates. A background
stream keeps the worker stepping, so the pair arrives mid-step and both join the next one (an
idle worker would start a step for whichever arrives first and leave the other a step behind):
token k of both is then produced by the same step, and when the client sees it differs only by
the path (door: gRPC receive, JSON, SSE; client: HTTP and SSE parsing). The client is
`alise bench`'s own backends. Prints medians per door, their differences and the
paired differences (HTTP minus gRPC, per round for TTFT, per token for delivery time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from itertools import pairwise

from alise.tools.bench.backends import GrpcBackend, OpenAIBackend, Send, StreamEnd
from alise.tools.lab.local_cluster import cpu_cluster, cpu_seconds


async def timed(backend, send: Send, t0: float) -> list[tuple[float, int]]:
    """(seconds since t0, tokens) of each chunk."""
    out = []
    async for event in backend.stream(send):
        if isinstance(event, StreamEnd):
            if event.num_tokens != sum(n for _, n in out):
                raise RuntimeError(f"{backend.name}: {event.num_tokens} tokens reported, "
                                   f"{sum(n for _, n in out)} received")
            break
        out.append((time.monotonic() - t0, event))
    return out


def token_times(chunks: list[tuple[float, int]]) -> list[float]:
    return [t for t, n in chunks for _ in range(n)]


async def keep_stepping(backend: GrpcBackend) -> None:
    """One long request after another, so the worker never idles between rounds."""
    i = 0
    while True:
        async for _ in backend.stream(Send("background", 1500, 0, f"ovh-bg-{i}", 600.0)):
            pass
        i += 1


async def measure(address: str, base_url: str, pairs: int, tokens: int, warmup: int) -> dict:
    grpc_b, http_b, bg = GrpcBackend(address), OpenAIBackend(base_url, token_ids=True), GrpcBackend(address)
    rows = dict(ttft_grpc=[], ttft_http=[], itl_grpc=[], itl_http=[], ttft_paired=[], delivery_paired=[],
                gap_paired=[])
    async with grpc_b, http_b, bg:
        background = asyncio.create_task(keep_stepping(bg))
        await asyncio.sleep(1.0)
        for i in range(warmup + pairs):
            sends = {b.name: Send(f"benchmark round {i}", tokens, 0, f"ovh-{b.name}-{i}", 60.0)
                     for b in (grpc_b, http_b)}
            order = (grpc_b, http_b) if i % 2 == 0 else (http_b, grpc_b)
            t0 = time.monotonic()
            tasks = {b.name: asyncio.create_task(timed(b, sends[b.name], t0)) for b in order}
            g, h = await tasks["grpc"], await tasks["openai"]
            if i < warmup:
                continue
            gt, ht = token_times(g), token_times(h)
            rows["ttft_grpc"].append(gt[0])
            rows["ttft_http"].append(ht[0])
            rows["itl_grpc"] += [b - a for (a, _), (b, _) in pairwise(g)]
            rows["itl_http"] += [b - a for (a, _), (b, _) in pairwise(h)]
            rows["ttft_paired"].append(ht[0] - gt[0])
            rows["delivery_paired"] += [b - a for a, b in zip(gt, ht, strict=True)]
            gg, hg = [b - a for a, b in pairwise(gt)], [b - a for a, b in pairwise(ht)]
            rows["gap_paired"] += [y - x for x, y in zip(gg, hg, strict=True)]
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
    return rows


def report(rows: dict, args, load: tuple[float, float]) -> str:
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    p90 = lambda xs: sorted(xs)[int(0.9 * (len(xs) - 1))] * 1e3  # noqa: E731
    lines = [f"HTTP door vs gRPC door, same run: {args.pairs} pairs x {args.tokens} tokens, CPU cluster of "
             f"`alise up` (tiny-llama, random weights, 1 worker{', predictor' if args.predictor else ''}); "
             f"load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores",
             f"  {'':<34}{'gRPC':>9}{'HTTP':>9}{'HTTP-gRPC':>11}{'paired':>9}"]
    lines.append(f"  {'TTFT median (ms)':<34}{med(rows['ttft_grpc']):9.2f}{med(rows['ttft_http']):9.2f}"
                 f"{med(rows['ttft_http']) - med(rows['ttft_grpc']):11.3f}{med(rows['ttft_paired']):9.3f}")
    lines.append(f"  {'inter-token gap median (ms)':<34}{med(rows['itl_grpc']):9.2f}{med(rows['itl_http']):9.2f}"
                 f"{med(rows['itl_http']) - med(rows['itl_grpc']):11.3f}{'':>9}")
    lines.append(f"  {'inter-token gap, paired (ms)':<34}{'':>9}{'':>9}{'':>11}{med(rows['gap_paired']):9.3f}")
    lines.append(f"  {'inter-token gap, paired mean (ms)':<34}{'':>9}{'':>9}{'':>11}"
                 f"{statistics.fmean(rows['gap_paired']) * 1e3:9.3f}")
    lines.append(f"  {'inter-token gap mean (ms)':<34}{statistics.fmean(rows['itl_grpc']) * 1e3:9.2f}"
                 f"{statistics.fmean(rows['itl_http']) * 1e3:9.2f}"
                 f"{(statistics.fmean(rows['itl_http']) - statistics.fmean(rows['itl_grpc'])) * 1e3:11.3f}{'':>9}")
    lines.append(f"  {'inter-token gap p90 (ms)':<34}{p90(rows['itl_grpc']):9.2f}{p90(rows['itl_http']):9.2f}"
                 f"{p90(rows['itl_http']) - p90(rows['itl_grpc']):11.3f}{'':>9}")
    lines.append(f"  {'token delivery, HTTP after gRPC (ms)':<34}{'':>9}{'':>9}{'':>11}"
                 f"{med(rows['delivery_paired']):9.3f}")
    lines.append("  paired: median (or mean) over rounds (TTFT), tokens (delivery) or gaps of HTTP minus gRPC,"
                 " the two requests in the same steps")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=120)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--predictor", action="store_true", help="run the predictor too (as `alise up` does)")
    args = p.parse_args()
    with cpu_cluster(predictor=args.predictor) as (cluster, address, base_url):
        before, door_cpu = os.getloadavg()[0], cpu_seconds(cluster.procs["http"].pid)
        rows = asyncio.run(measure(address, base_url, args.pairs, args.tokens, args.warmup))
        door_cpu = cpu_seconds(cluster.procs["http"].pid) - door_cpu
        print(report(rows, args, (before, os.getloadavg()[0])))
        requests = args.pairs + args.warmup
        print(f"  the door's own CPU time (user + system): {door_cpu * 1e6 / (requests * args.tokens):.0f} us "
              f"per token relayed, {door_cpu * 1e3 / requests:.2f} ms per {args.tokens}-token request "
              f"(including its 0.5 s health polls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
