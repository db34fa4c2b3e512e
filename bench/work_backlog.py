"""Work backlog of real `alise bench` runs, in the simulator's terms: the share of the run's decode
steps (one an output token) still to run when each request arrived; printed at the middle and the
last arrival, with its growth over the second half of the arrivals (mean over the last quarter
less mean over the second quarter). The simulator calls a run sustained when that growth is at
most 2.5 % of the run's work (``alise.tools.sim.sweep``). The same growth in KV token-steps (each
token weighted by its context: the memory-time a long job leaves behind) is printed beside it
(``alise.tools.sim.simulator.WorkMeter``).

    python bench/work_backlog.py RUN-requests.jsonl.gz [...]
    python bench/work_backlog.py bench/results/real-cpu.json        # every policy of a real_cpu_compare run

A request's tokens are taken to arrive evenly between its first token and its end (the request
log has no per-token times), so the figure is an estimate. Also prints the offered output token
rate (output tokens over the span of the arrivals).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics

from alise.tools.sim.simulator import WorkMeter, backlog_growth


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
    print(f"{'run':<34} {'reqs':>5} {'last arr s':>10} {'makespan s':>10} {'offered tok/s':>13} "
          f"{'backlog mid':>11} {'last':>6} {'growth':>7} {'KV growth':>9} {'mean norm ms':>12}")
    for path in args.runs:
        for name, rows in load(path).items():
            report(name, [r for r in rows if not r.get("error")])


def report(name: str, rows: list[dict]) -> None:
    sent = sorted(r["sent_s"] for r in rows)
    start, last = sent[0], sent[-1]
    meter = WorkMeter({str(i): (r["prompt_tokens"], r["output_tokens"]) for i, r in enumerate(rows)})

    def left(t: float) -> tuple[float, float]:
        steps = memory = 0.0
        for i, r in enumerate(rows):
            if r["sent_s"] <= t:
                done = int(generated_by(r, t))
                steps += meter.steps_left(str(i), done)
                memory += meter.memory_left(str(i), done)
        return steps / meter.total_steps, memory / meter.total_memory

    backlog = [left(t) for t in sent]
    work = [b[0] for b in backlog]
    makespan = max(r["sent_s"] + r["e2e_s"] for r in rows) - start
    offered = sum(r["output_tokens"] for r in rows) / (last - start)
    mean = statistics.fmean(r["normalized_latency_s"] for r in rows)
    print(f"{name[-34:]:<34} {len(rows):5d} {last - start:10.1f} {makespan:10.1f} {offered:13.0f} "
          f"{work[(len(work) + 1) // 2 - 1]:11.3f} {work[-1]:6.3f} {backlog_growth(work):+7.3f} "
          f"{backlog_growth([b[1] for b in backlog]):+9.3f} {mean * 1e3:12.1f}")


if __name__ == "__main__":
    main()
