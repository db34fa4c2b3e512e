"""Work backlog of real `alise bench` runs: the share of output tokens still to generate when the
last request arrived, the rule by which the simulator calls a run sustained (<= 5 %).

    python bench/work_backlog.py RUN-requests.jsonl.gz [...]

A request's tokens are taken to arrive evenly between its first token and its end (the request
log has no per-token times), so the figure is an estimate. Also prints the offered and served
output token rates: a run whose offered rate exceeds what it served over the arrivals is in
overload, whatever its finite-trace mean says.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generated_by(row: dict, t: float) -> float:
    first = row["sent_s"] + row["ttft_s"]
    end = row["sent_s"] + row["e2e_s"]
    n = row["output_tokens"]
    if t >= end:
        return n
    if t < first:
        return 0.0
    return 1 + (n - 1) * (t - first) / max(end - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    print(f"{'run':<48} {'reqs':>5} {'last arrival s':>14} {'makespan s':>10} "
          f"{'offered tok/s':>13} {'work backlog':>12} {'mean norm ms':>12}")
    for path in args.runs:
        rows = [r for r in load(path) if not r.get("error")]
        last = max(r["sent_s"] for r in rows)
        start = min(r["sent_s"] for r in rows)
        total = sum(r["output_tokens"] for r in rows)
        left = total - sum(generated_by(r, last) for r in rows)
        makespan = max(r["sent_s"] + r["e2e_s"] for r in rows) - start
        offered = total / (last - start)
        mean = statistics.fmean(r["normalized_latency_s"] for r in rows)
        print(f"{path[-48:]:<48} {len(rows):5d} {last - start:14.1f} {makespan:10.1f} "
              f"{offered:13.0f} {left / total:12.3f} {mean * 1e3:12.1f}")


if __name__ == "__main__":
    main()
