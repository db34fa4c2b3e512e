"""Work backlog of real `alise bench` runs: the share of the run's output tokens still to generate
when the middle and the last request arrived. The simulator calls a run sustained when it grows
by at most 2.5 % of the run's tokens in between (``alise.sim.sweep``).

    python bench/work_backlog.py RUN-requests.jsonl.gz [...]
    python bench/work_backlog.py bench/results/real-cpu.json      # every policy of a real_cpu_compare run

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


def load(path: str) -> dict[str, list[dict]]:
    """Request records by run name: one run per JSONL file, one per policy in a
    ``bench/real_cpu_compare.py`` JSON."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            doc = json.load(f)
            return {f"{path.rsplit('/', 1)[-1]} {policy}": res["requests"]
                    for policy, res in doc["results"].items()}
        return {path.rsplit("/", 1)[-1]: [json.loads(line) for line in f if line.strip()]}


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
    print(f"{'run':<40} {'reqs':>5} {'last arrival s':>14} {'makespan s':>10} "
          f"{'offered tok/s':>13} {'backlog mid':>11} {'last':>6} {'growth':>7} {'mean norm ms':>12}")
    for name, rows in ((n, rs) for path in args.runs for n, rs in load(path).items()):
        rows = [r for r in rows if not r.get("error")]
        sent = sorted(r["sent_s"] for r in rows)
        start, mid, last = sent[0], sent[(len(sent) + 1) // 2 - 1], sent[-1]
        total = sum(r["output_tokens"] for r in rows)

        def left(t: float) -> float:
            return sum(r["output_tokens"] - generated_by(r, t) for r in rows if r["sent_s"] <= t) / total

        makespan = max(r["sent_s"] + r["e2e_s"] for r in rows) - start
        offered = total / (last - start)
        mean = statistics.fmean(r["normalized_latency_s"] for r in rows)
        print(f"{name[-40:]:<40} {len(rows):5d} {last - start:14.1f} {makespan:10.1f} "
              f"{offered:13.0f} {left(mid):11.3f} {left(last):6.3f} {left(last) - left(mid):+7.3f} "
              f"{mean * 1e3:12.1f}")


if __name__ == "__main__":
    main()
