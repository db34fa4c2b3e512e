"""Replays a trace against a running cluster and prints one summary line (GPU serving runs).

    python3 bench/gpu/drive.py --trace T --address A --tag NAME [--all-at-once] [--rate R]
        [--steps STEP_LOG] [--out DIR]

Open loop through the SDK (``alise.tools.bench.openloop``): each request at its arrival time (all at
once with ``--all-at-once``; rescaled to ``--rate`` req/s if given), generating its trace
length. Prints requests served, output tokens per second over the span (first request sent
to last token), mean / p99 normalized latency, mean TTFT, TPOT mean / p99, and, from the
worker's ``--step-log``, the busy fraction: the seconds of the model steps over the span.
Writes ``DIR/NAME-requests.jsonl`` and appends the summary as JSON to ``DIR/summary.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from alise.tools.bench.openloop import run_bench
from alise.tools.trace import read_trace, rescale


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))] if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", required=True)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--tag", required=True)
    p.add_argument("--all-at-once", action="store_true")
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--num", type=int, default=0)
    p.add_argument("--steps", default="")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    trace = read_trace(args.trace)[:args.num or None]
    if args.all_at_once:
        trace = [replace(r, arrival_s=0.0) for r in trace]
    elif args.rate:
        trace = rescale(trace, args.rate)
    started = time.monotonic()
    results = asyncio.run(run_bench(trace, args.address, request_prefix=f"{args.tag}-"))
    ok = [r for r in results if not r.error]
    span = max(r.sent_s + r.e2e_s for r in ok)
    tokens = sum(r.num_tokens for r in ok)
    norm = [r.normalized_latency_s for r in ok]
    tpot = [r.tpot_s for r in ok if r.tpot_s == r.tpot_s]
    busy = None
    if args.steps and Path(args.steps).exists():
        rows = [json.loads(line) for line in Path(args.steps).read_text().splitlines()]
        # Step logs of this tree carry each step's end on the worker's monotonic clock, which
        # on one machine is this one's: count the steps inside the run's span.
        if rows and "end_s" in rows[0]:
            rows = [r for r in rows if started <= r["end_s"] <= started + span + 1.0]
        busy = sum(r["seconds"] for r in rows) / span
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.tag}-requests.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")
    summary = dict(tag=args.tag, requests=len(ok), of=len(results), span_s=span, tok_s=tokens / span,
                   mean_norm_ms=1e3 * statistics.fmean(norm), p99_norm_ms=1e3 * pct(norm, 0.99),
                   mean_ttft_s=statistics.fmean(r.ttft_s for r in ok), mean_tpot_ms=1e3 * statistics.fmean(tpot),
                   p99_tpot_ms=1e3 * pct(tpot, 0.99), busy=busy)
    with open(out / "summary.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(f"{args.tag:<16} requests {len(ok)}/{len(results)}  output tok/s {summary['tok_s']:7.1f}  "
          f"norm mean {summary['mean_norm_ms']:6.1f} p99 {summary['p99_norm_ms']:6.1f} ms/token  "
          f"TTFT {summary['mean_ttft_s']:5.2f} s  TPOT mean {summary['mean_tpot_ms']:5.1f} p99 "
          f"{summary['p99_tpot_ms']:5.1f} ms  busy {busy if busy is None else round(busy, 3)}  span {span:.1f} s",
          flush=True)


if __name__ == "__main__":
    main()
