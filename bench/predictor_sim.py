"""Simulated: how close the predictor's ranking gets ``alise`` to ``oracle`` near capacity.

    .venv/bin/python bench/predictor_sim.py [--profile profiles/opt-13b-h200-served.json]
        [--fraction 0.9] [--predictor predictor] [--out /tmp/predictor_sim.json]

Four traces (``chat`` and ``alpaca``, Poisson and bursty Gamma CV 3, 800 requests, seed 0),
each replayed at ``--fraction`` of its capacity bound (``alise.tools.sim.sweep.capacity_bound``:
the rate no policy can exceed with the worker's KV and the profile) through the simulator,
with fcfs, alise (cross-fitted estimates of ``alise.tools.sim.predictions``: no request is
predicted by a model that saw its length) and oracle (true lengths). Prints mean normalized
latency per policy and alise/oracle, with the estimates' Kendall tau. A simulation,
labelled as one.

``--noise 0.25,0.5,...`` also runs alise on *noisy oracle* estimates: each request's true
log-length plus seeded Gaussian noise of that standard deviation (p90 from the same
log-normal). Their tau against alise/oracle says how good a ranking each trace needs for a
given gap to oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from alise.tools.sim.flags import add_scheduling_flags, scheduling_from_args
from alise.tools.sim.predictions import cross_fitted_estimates, kendall_tau
from alise.tools.sim.report import load_profile
from alise.tools.sim.simulator import SimConfig
from alise.tools.sim.sweep import as_dict, capacity_bound, sweep
from alise.tools.trace import build_trace, load_pairs, workload_path

POLICIES = ("fcfs", "alise", "oracle")


def noisy_oracle(requests, sigma: float, seed: int = 0) -> dict:
    """True log-lengths plus N(0, sigma) noise, as length estimates (p90 of that log-normal)."""
    from alise.core.job import LengthEstimate

    rng = random.Random(seed)
    out = {}
    for i, r in enumerate(requests):
        z = max(math.log1p(r.output_tokens) + rng.gauss(0.0, sigma), 0.0)  # no negative length
        out[i] = LengthEstimate(mean=math.expm1(z + sigma * sigma / 2), p50=math.expm1(z),
                                p90=math.expm1(z + 1.2816 * sigma))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="profiles/opt-13b-h200-served.json")
    parser.add_argument("--fraction", type=float, default=0.9, help="of the capacity bound")
    parser.add_argument("--predictor", default="predictor", choices=("predictor", "knn"))
    parser.add_argument("--num", type=int, default=800)
    parser.add_argument("--out", default="/tmp/predictor_sim.json")
    parser.add_argument("--noise", default="",
                        help="also run alise on noisy-oracle estimates with these log-space sigmas, "
                             "comma-separated (default: none)")
    add_scheduling_flags(parser)
    args = parser.parse_args()
    sigmas = [float(x) for x in args.noise.split(",") if x]
    latency = load_profile(args.profile)
    config = SimConfig(scheduling=scheduling_from_args(args))
    rows, runs = [], []
    print(f"SIMULATED ({args.profile}, kv_tokens {config.kv_tokens}, prefill step ratio "
          f"{config.scheduling.prefill_step_ratio:g}); rate = {args.fraction:g} x capacity bound "
          "(without that cap); "
          "mean normalized latency in ms/token")
    print(f"{'trace':<16} {'bound':>7} {'rate':>7} {'tau':>6} {'fcfs':>8} {'alise':>8} "
          f"{'oracle':>8} {'alise/oracle':>13}")
    for workload in ("chat", "alpaca"):
        pairs = load_pairs(workload_path(workload))
        for bursty in (False, True):
            name = f"{workload}{' CV3' if bursty else ''}"
            started = time.perf_counter()
            requests = build_trace(pairs, num=args.num, rate=1.0, bursty=bursty, cv=3.0, seed=0)
            estimates, source = cross_fitted_estimates(requests, method=args.predictor)
            bound = capacity_bound(requests, latency, config)
            rate = round(args.fraction * bound, 3)
            result = {s.policy: s for s in sweep(requests, POLICIES, [rate], latency, config,
                                                 estimates=estimates, jobs=2)}
            ms = {p: result[p].mean_normalized_latency_s * 1000 for p in POLICIES}
            tau = kendall_tau(estimates, requests)
            print(f"{name:<16} {bound:7.2f} {rate:7.2f} {tau:6.3f} {ms['fcfs']:8.2f} {ms['alise']:8.2f} "
                  f"{ms['oracle']:8.2f} {ms['alise'] / ms['oracle']:12.3f}x "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            noisy = []
            for sigma in sigmas:
                guess = noisy_oracle(requests, sigma)
                run = sweep(requests, ("alise",), [rate], latency, config, estimates=guess, jobs=1)[0]
                noisy_ms = run.mean_normalized_latency_s * 1000
                noisy.append(dict(sigma=sigma, tau=kendall_tau(guess, requests), ms=noisy_ms))
                print(f"{'  noisy oracle':<16} {'sigma':>7} {sigma:7.2f} {noisy[-1]['tau']:6.3f} "
                      f"{'':>8} {noisy_ms:8.2f} {'':>8} {noisy_ms / ms['oracle']:12.3f}x", flush=True)
            rows.append(dict(trace=name, bound=bound, rate=rate, tau=tau, source=source, ms=ms,
                             noisy=noisy))
            runs += [as_dict(s) for s in result.values()]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(profile=args.profile, fraction=args.fraction, rows=rows, runs=runs), f, indent=1)
    print(f"estimates: {rows[0]['source']}; JSON: {args.out}")


if __name__ == "__main__":
    main()
