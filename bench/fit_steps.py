"""A latency profile from the steps a worker ran while serving (``alise worker --step-log``).

    python bench/fit_steps.py --steps fcfs-steps.jsonl [--steps ...] \
        [--scheduler-log fcfs-scheduler.log ...] [--check profiles/X.json ...] [--out profile.json]

The worker's start-up profiler (``--profile-latency``) times synthetic steps one at a time; a
serving step runs between gRPC round trips, with new prompt lengths every step and a scheduler
feeding it. This fits the same ``LatencyModel`` to the steps of a real run instead, and prints,
split into decode-only and mixed steps (those with prefill chunks), the mean measured step time
against what the fitted profile and each ``--check`` profile price the same steps at.
``c_cycle_s``, the time a served step spends outside the forward pass, comes from the step
log itself where it has each step's end (``end_s``): the mean gap between a step's end and the
next one's start while the worker had jobs running (the next step's ``waited_s`` set). For step
logs without it (earlier, lock-step runs) ``--scheduler-log`` gives the cycle-weighted mean of
the per-cycle worker host + transport + scheduler time in the scheduler's cycle log lines.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from datetime import date
from itertools import pairwise
from pathlib import Path

from alise.core.latency_model import LatencyModel
from alise.tools.lab.files import open_text

CYCLE_LINE = re.compile(r"(\d+) cycles; per cycle [\d.]+ ms: device [\d.]+, worker host \+ transport "
                        r"([\d.]+), scheduler ([\d.]+)")


def load_steps(paths: list[str]) -> list[tuple[int, int, list[int], float, list[int]]]:
    samples = []
    for path in paths:
        with open_text(path) as f:
            for line in f:
                r = json.loads(line)
                samples.append((r["num_seqs"], r["context"], r["prefill_lens"], r["seconds"],
                                r.get("prefill_starts") or [0] * len(r["prefill_lens"])))
    return samples


def step_gap_s(paths: list[str]) -> tuple[float, int] | None:
    """Mean seconds between a step's end and the next step's start while jobs ran (from the
    steps' ``end_s``), and how many gaps; None when the logs do not have ``end_s``."""
    gaps = []
    for path in paths:
        with open_text(path) as f:
            rows = [json.loads(line) for line in f]
        if not rows or "end_s" not in rows[0]:
            return None
        for prev, row in pairwise(rows):
            if row.get("waited_s") is not None:
                gaps.append(row["end_s"] - row["seconds"] - prev["end_s"])
    return (statistics.fmean(gaps), len(gaps)) if gaps else None


def cycle_overhead_s(paths: list[str]) -> tuple[float, int]:
    """Cycle-weighted mean of worker host + transport + scheduler seconds, and the cycle count."""
    cycles, total = 0, 0.0
    for path in paths:
        with open_text(path) as f:
            for line in f:
                m = CYCLE_LINE.search(line)
                if m:
                    n = int(m[1])
                    cycles += n
                    total += n * (float(m[2]) + float(m[3])) / 1e3
    if not cycles:
        raise SystemExit(f"no cycle log lines in {paths}")
    return total / cycles, cycles


def priced(model: LatencyModel, samples) -> dict[str, tuple[int, float, float, float]]:
    """Per kind: steps, mean measured ms, mean priced ms (forward only), mean |relative error|."""
    out = {}
    for kind, rows in (("decode-only", [s for s in samples if not s[2]]), ("mixed", [s for s in samples if s[2]]),
                       ("all", samples)):
        if not rows:
            continue
        measured = [s[3] for s in rows]
        predicted = [model.forward_s(n, ctx, pre, starts) for n, ctx, pre, _, starts in rows]
        errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
        out[kind] = (len(rows), 1e3 * statistics.fmean(measured), 1e3 * statistics.fmean(predicted),
                     statistics.fmean(errors))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", action="append", required=True, help="a worker's --step-log file (repeatable)")
    ap.add_argument("--scheduler-log", action="append", default=[], help="scheduler log with cycle lines")
    ap.add_argument("--check", action="append", default=[], help="another profile to price the same steps")
    ap.add_argument("--name", default="served")
    ap.add_argument("--out", help="write the fitted profile here")
    args = ap.parse_args()

    samples = load_steps(args.steps)
    if len(samples) < len(LatencyModel.FITTED):
        raise SystemExit(f"{len(samples)} steps are too few to fit {len(LatencyModel.FITTED)} coefficients")
    # Absolute least squares: the fitted step times add up to the run's busy time.
    model = LatencyModel.fit(samples, name=args.name, relative=False)
    fit = priced(model, samples)
    model.meta.update(kind="measured while serving", date=date.today().isoformat(),
                      command="python bench/fit_steps.py " + " ".join(sys.argv[1:]),
                      steps=args.steps, num_samples=len(samples),
                      fit_mean_rel_error=fit["all"][3],
                      by_kind={k: dict(steps=v[0], measured_ms=round(v[1], 3), fitted_ms=round(v[2], 3),
                                       mean_rel_error=round(v[3], 4)) for k, v in fit.items()})
    gap = step_gap_s(args.steps)
    if gap is not None:
        model.c_cycle_s, gaps = gap
        model.meta["cycle_overhead"] = dict(c_cycle_s=model.c_cycle_s, gaps=gaps, source="step logs (end_s)")
    elif args.scheduler_log:
        model.c_cycle_s, cycles = cycle_overhead_s(args.scheduler_log)
        model.meta["cycle_overhead"] = dict(c_cycle_s=model.c_cycle_s, cycles=cycles, logs=args.scheduler_log)

    print(f"{len(samples)} steps from {', '.join(args.steps)}")
    print("fitted: " + ", ".join(f"{k} {1e3 * getattr(model, k):.4g} ms" for k in LatencyModel.FITTED)
          + (f"; c_cycle_s {1e3 * model.c_cycle_s:.2f} ms" if "cycle_overhead" in model.meta else ""))
    profiles = [("fitted to these steps", model)] + [(p, LatencyModel.load(p)) for p in args.check]
    width = max(len(label) for label, _ in profiles)
    print(f"{'profile':<{width}} {'kind':<12} {'steps':>6} {'measured ms':>12} {'priced ms':>10} {'|error|':>8}")
    for label, profile in profiles:
        for kind, (n, measured, pred, err) in priced(profile, samples).items():
            print(f"{label:<{width}} {kind:<12} {n:>6} {measured:>12.2f} {pred:>10.2f} {100 * err:>7.1f}%")
    if args.out:
        Path(args.out).write_text(model.to_json() + "\n", encoding="utf-8")
        print(f"profile: {args.out}")


if __name__ == "__main__":
    main()
