"""Real cluster on this CPU, tiny model: fcfs vs alise (vs oracle) at one loaded rate, one run.

    python bench/real_cpu_compare.py [--rate 1.6] [--num 60] [--out bench/results/real-cpu.json]

The scheduler and worker are the real services in this process (loopback gRPC, the real
engine loop and model runner, random-weight tiny-llama); requests come open-loop through the
SDK from a trace built by `alise trace` (AlpacaEval prompts, text_davinci_003 lengths, capped
at --max-output so a run takes a minute or two). alise gets cross-fitted estimates of the
project's predictor (the same table `alise sim` uses). Every policy replays the same requests,
each with the simulator's max_tokens cap; a job ends at its trace length, which only the
oracle policy sees (``alise.tools.bench.openloop``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from alise.tools.bench.cluster import run_on_cluster
from alise.tools.bench.openloop import summarize
from alise.tools.lab.replay import estimates_by_prompt, pick_requests


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", default="bench/traces/alpaca.jsonl")
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--rate", type=float, default=1.6)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--policies", default="fcfs,alise")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--blocks", type=int, default=48, help="worker KV blocks of 16 tokens")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--predictor", default="predictor", choices=["predictor", "knn"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="profiles/tiny-llama-cpu.json",
                   help="the scheduler's latency profile (measure it with bench/cpu_profile.py)")
    p.add_argument("--out", default="bench/results/real-cpu.json")
    args = p.parse_args()

    requests = pick_requests(args.trace, args.num, args.rate, args.max_output, args.seed)
    table, source = estimates_by_prompt(args.trace, args.predictor)
    worker = dict(num_device_blocks=args.blocks, max_num_seqs=args.max_num_seqs)
    results = {}
    for policy in args.policies.split(","):
        stats: dict = {}
        runs = asyncio.run(run_on_cluster(requests, policy=policy, model=args.model,
                                          estimates_by_prompt=table, worker_overrides=worker,
                                          latency_profile=args.profile, stats=stats))
        results[policy] = dict(summary=summarize(runs), core=stats,
                               requests=[r.__dict__ for r in runs])
        s = results[policy]["summary"]
        print(f"[{policy}] {s['num_ok']}/{s['num_requests']} ok in {s['duration_s']:.1f} s; "
              f"core: {stats}", flush=True)
    print(f"\nREAL cluster on this CPU: {args.model} (random weights), 1 worker, {args.blocks} KV "
          f"blocks x 16 tokens, max {args.max_num_seqs} seqs; {args.num} requests from {args.trace} "
          f"(outputs capped at {args.max_output}), Poisson {args.rate} req/s; alise estimates: {source}")
    print(f"  {'policy':<8}{'mean NL s/tok':>14}{'p50 NL':>9}{'p99 NL':>9}{'tail p99':>10}"
          f"{'mean TTFT':>11}{'mean e2e':>10}{'req/s':>7}")
    for policy, r in results.items():
        s = r["summary"]
        nl = s["normalized_latency_s"]
        print(f"  {policy:<8}{nl['mean']:14.4f}{nl['p50']:9.4f}{nl['p99']:9.4f}"
              f"{s['p99_longest5_normalized_latency_s']:10.4f}{s['ttft_s']['mean']:11.3f}"
              f"{s['e2e_s']['mean']:10.2f}{s['throughput_req_s']:7.2f}")
    if "fcfs" in results:
        base = results["fcfs"]["summary"]["normalized_latency_s"]["mean"]
        for policy, r in results.items():
            if policy != "fcfs":
                mean = r["summary"]["normalized_latency_s"]["mean"]
                print(f"  mean normalized latency fcfs/{policy}: {base / mean:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        label="real cluster, CPU", model=args.model, num=args.num, rate=args.rate,
        max_output=args.max_output, blocks=args.blocks, max_num_seqs=args.max_num_seqs,
        predictions=source, results=results), indent=1))
    print(f"  results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
