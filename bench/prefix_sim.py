"""A multi-turn trace simulated with prefix caching on and off: hit rate, prefill tokens
computed, TTFT p50 / p90 (SIMULATED: the real scheduler core and worker engine, a latency
profile for the forward pass).

  alise trace --workload multiturn --num 400 --rate 4 --turns 2-6 --think-time-s 2 --out T.jsonl
  python bench/prefix_sim.py T.jsonl [--profile profiles/opt-13b-h100.json] [--policy alise]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

from alise.core.config import SchedulingConfig
from alise.tools.sim.profiles import profile_label
from alise.tools.sim.report import load_profile
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.trace import read_trace


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--profile", default=None, help="latency profile JSON (default: the simulator's)")
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--kv-tokens", type=int, default=SimConfig.kv_tokens)
    args = p.parse_args()
    requests = read_trace(args.trace)
    latency = load_profile(args.profile)
    base = SimConfig(kv_tokens=args.kv_tokens, scheduling=SchedulingConfig(policy=args.policy))
    print(f"SIMULATED, profile {profile_label(latency)}, {len(requests)} requests of {args.trace}, "
          f"policy {args.policy}, {args.kv_tokens:,} KV tokens")
    print(f"{'caching':<8}{'prompt tok':>12}{'cached':>11}{'hit rate':>10}{'prefill computed':>18}"
          f"{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}{'mean e2e s':>12}")
    rows = {}
    for arm, enabled in (("on", True), ("off", False)):
        result = simulate(requests, latency, replace(base, enable_prefix_caching=enabled))
        ttft = sorted(r.ttft_s for r in result.records)
        c = result.prefill
        rows[arm] = (c.num_computed_tokens, statistics.median(ttft), ttft[int(0.9 * (len(ttft) - 1))])
        print(f"{arm:<8}{c.num_admitted_tokens:>12,}{c.num_cached_tokens:>11,}{c.hit_rate:>10.1%}"
              f"{c.num_computed_tokens:>18,}{1e3 * rows[arm][1]:>13.1f}{1e3 * rows[arm][2]:>13.1f}"
              f"{statistics.fmean(r.e2e_s for r in result.records):>12.2f}")
    on, off = rows["on"], rows["off"]
    print(f"on/off: prefill tokens computed {on[0] / off[0]:.2f}x, TTFT p50 {on[1] / off[1]:.2f}x, "
          f"p90 {on[2] / off[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
