"""Checks the simulator against a real run: same requests, same policy, same worker shape.

    python bench/sim_vs_real.py [--policy fcfs] [--num 40] [--rate 1.0]

1. measures the tiny model's latency profile on this CPU (bench/cpu_profile.py's function),
2. replays the requests on a real in-process cluster (scheduler + worker services, SDK),
3. simulates the same requests with that profile and the same KV blocks / max seqs,
and prints the mean normalized latency of both and their difference (goal: within 15 %).
Both send every request the same max_tokens cap (``alise.tools.bench.openloop.DEFAULT_MAX_TOKENS``)
and end each job at its trace length, which only the oracle policy sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from alise.core.config import SchedulingConfig
from alise.tools.bench.cluster import run_on_cluster
from alise.tools.bench.openloop import DEFAULT_MAX_TOKENS
from alise.tools.lab.replay import estimates_by_prompt, pick_requests
from alise.tools.sim.profiles import measure_cpu_profile
from alise.tools.sim.simulator import SimConfig, simulate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", default="bench/traces/alpaca.jsonl")
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    p.add_argument("--out", default="bench/results/sim-vs-real.json")
    args = p.parse_args()

    from alise.core.latency_model import LatencyModel

    latency = LatencyModel.load(args.profile) if args.profile else measure_cpu_profile("tiny-llama")
    profile_path = "/tmp/alise-sim-vs-real-profile.json"
    Path(profile_path).write_text(latency.to_json())
    requests = pick_requests(args.trace, args.num, args.rate, args.max_output, seed=1)
    table, source = estimates_by_prompt(args.trace, "predictor")
    stats: dict = {}
    real = asyncio.run(run_on_cluster(
        requests, policy=args.policy, model="tiny-llama", estimates_by_prompt=table,
        worker_overrides=dict(num_device_blocks=args.blocks, max_num_seqs=args.max_num_seqs),
        latency_profile=profile_path, stats=stats))
    real_nl = statistics.fmean(r.normalized_latency_s for r in real if not r.error)

    estimates = {i: table[r.prompt] for i, r in enumerate(requests)}
    config = SimConfig(kv_tokens=args.blocks * 16, max_num_seqs=args.max_num_seqs,
                       max_model_len=2048, max_tokens=DEFAULT_MAX_TOKENS,
                       scheduling=SchedulingConfig(policy=args.policy))
    sim = simulate(requests, latency, config, estimates=estimates)
    sim_nl = statistics.fmean(r.normalized_latency_s for r in sim.records)
    diff = (sim_nl - real_nl) / real_nl
    # The same simulation with the profile scaled by the scheduler's online correction (its
    # measured-over-modelled step time during the real run): how much of the gap is the
    # machine's speed drifting between profiling and the run (this CPU is shared).
    latency.correction = stats.get("latency_correction", 1.0)
    sim2 = simulate(requests, latency, config, estimates=estimates)
    sim2_nl = statistics.fmean(r.normalized_latency_s for r in sim2.records)
    latency.correction = 1.0
    print(f"policy {args.policy}, {args.num} requests at {args.rate} req/s (Poisson), outputs <= "
          f"{args.max_output}, {args.blocks} blocks x 16, max {args.max_num_seqs} seqs; "
          f"profile: {latency.name} ({latency.meta.get('device')}), c0 {latency.c0_s * 1e3:.1f} ms")
    print(f"  REAL cluster (CPU):  mean normalized latency {real_nl:.4f} s/token; core {stats}")
    print(f"  SIMULATED:           mean normalized latency {sim_nl:.4f} s/token; "
          f"preemptions {dict(sim.preemptions)}")
    print(f"  simulated vs real: {diff * 100:+.1f} % (goal: within 15 %)")
    print(f"  SIMULATED with the run's online correction x{stats.get('latency_correction', 1.0):.3f}: "
          f"{sim2_nl:.4f} s/token, {(sim2_nl - real_nl) / real_nl * 100:+.1f} % vs real")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        policy=args.policy, num=args.num, rate=args.rate, real_mean_nl_s=real_nl,
        sim_mean_nl_s=sim_nl, relative_difference=diff, sim_corrected_mean_nl_s=sim2_nl,
        profile=json.loads(latency.to_json()),
        real_core=stats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
