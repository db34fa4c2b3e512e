"""How much a step that carries prefill tokens costs next to a decode-only step of the same batch,
from the step logs of served runs (``alise worker --step-log``).

    python bench/step_ratio.py RUN-steps.jsonl [RUN-steps.jsonl ...] [--graph-rows 192]

For every step with prompt or recompute tokens (a "mixed" step) the ratio is its time over the
median decode-only step at the same number of sequences (the nearest batch size with at least
five decode-only steps where that one has fewer). Printed per run: the busy fraction (step
seconds / span), the decode-only median, the mixed steps' median and p99 time, and their ratio
at the median and p99 — over all mixed steps, over those within ``--graph-rows`` rows (steps
the worker replays from a mixed-step CUDA graph) and over those above it (run eagerly) — then
the same per batch-size band.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

BANDS = ((1, 8), (9, 16), (17, 32), (33, 48), (49, 64), (65, 128), (129, 256))
MIN_DECODES = 5


def load(path: str) -> list[dict]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def decode_medians(steps: list[dict]) -> dict[int, float]:
    by_batch: dict[int, list[float]] = defaultdict(list)
    for s in steps:
        if not s["prefill_lens"]:
            by_batch[s["num_seqs"]].append(s["seconds"])
    return {n: statistics.median(v) for n, v in by_batch.items() if len(v) >= MIN_DECODES}


def reference(medians: dict[int, float], num_seqs: int) -> float | None:
    if not medians:
        return None
    nearest = min(medians, key=lambda n: (abs(n - num_seqs), n))
    return medians[nearest]


def rows_of(step: dict) -> int:
    """Rows the step fed: one per decoding sequence plus every chunk's tokens."""
    return step["num_seqs"] - len(step["prefill_lens"]) + sum(step["prefill_lens"])


def summary(name: str, times: list[float], ratios: list[float]) -> str:
    if not times:
        return f"  {name:<22} {0:>6}"
    return (f"  {name:<22} {len(times):>6} {statistics.median(times) * 1e3:>9.2f} {pct(times, 99) * 1e3:>9.2f}"
            f" {statistics.median(ratios):>8.2f} {pct(ratios, 99):>8.2f}")


def report(path: str, graph_rows: int) -> None:
    steps = load(path)
    medians = decode_medians(steps)
    ends = [s["end_s"] for s in steps if s.get("end_s") is not None]
    span = max(ends) - min(e - s["seconds"] for e, s in zip(ends, steps, strict=True)) if ends else 0.0
    busy = sum(s["seconds"] for s in steps) / span if span else float("nan")
    decode = [s["seconds"] for s in steps if not s["prefill_lens"]]
    groups: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for s in steps:
        if not s["prefill_lens"]:
            continue
        ref = reference(medians, s["num_seqs"])
        if ref is None:
            continue
        keys = ["all mixed", f"<= {graph_rows} rows (graph)" if rows_of(s) <= graph_rows
                else f"> {graph_rows} rows (eager)"]
        keys += [f"batch {lo}-{hi}" for lo, hi in BANDS if lo <= s["num_seqs"] <= hi]
        for key in keys:
            groups[key][0].append(s["seconds"])
            groups[key][1].append(s["seconds"] / ref)
    print(f"{Path(path).name}: {len(steps)} steps, busy {busy:.3f}, decode-only {len(decode)} "
          f"(median {statistics.median(decode) * 1e3:.2f} ms)" if decode else f"{Path(path).name}: no decode step")
    print(f"  {'mixed steps':<22} {'n':>6} {'med ms':>9} {'p99 ms':>9} {'med x':>8} {'p99 x':>8}")
    for key in ("all mixed", f"<= {graph_rows} rows (graph)", f"> {graph_rows} rows (eager)",
                *(f"batch {lo}-{hi}" for lo, hi in BANDS)):
        if key in groups:
            print(summary(key, *groups[key]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", nargs="+", help="step logs (jsonl, or .gz)")
    p.add_argument("--graph-rows", type=int, default=192,
                   help="the largest mixed-step graph the worker kept (its log's plan lines)")
    args = p.parse_args()
    for path in args.steps:
        report(path, args.graph_rows)


if __name__ == "__main__":
    main()
