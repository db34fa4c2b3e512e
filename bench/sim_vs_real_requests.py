"""One simulated run against one real run, request by request, by output-length quintile.

    python bench/sim_vs_real_requests.py --trace T.jsonl --real RUN.jsonl[.gz] --policy alise \
        --rate 8 --profile P.json [--decision-profile Q.json] [--kv-tokens 15008 --max-num-seqs 64]

``--real`` is an ``alise bench`` record file of a run of the same trace at the same rate. The
simulation is the ``alise sim`` one (same core, same virtual worker); alise's estimates are
the cross-fitted ``predictor`` ones cached beside the trace by ``alise sim --predictor
predictor``. ``--decision-profile`` prices the scheduler's decisions with another profile
than the one that times the steps (the real scheduler's own, say). ``--job-log`` (the real
scheduler's ``--job-log`` file of the same run) replaces the cross-fitted estimates and the
trace's prompt lengths with what the real scheduler had: its predictor's estimate of each job
and the prompt's length in the served model's tokenizer. Prints mean normalized
latency, end-to-end latency and TTFT per quintile of output length, simulated and real.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from alise.core.config import SchedulingConfig
from alise.core.job import LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.tools.lab.files import open_text
from alise.tools.sim.predictions import cross_fitted_estimates
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.trace import read_trace, rescale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--real", required=True, help="alise bench records of the real run")
    ap.add_argument("--policy", default="alise")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--profile", required=True, help="latency profile that times the simulated steps")
    ap.add_argument("--decision-profile", help="profile the policy prices with (default: --profile)")
    ap.add_argument("--job-log", help="the real run's scheduler --job-log: its estimates and prompt lengths")
    ap.add_argument("--kv-tokens", type=int, default=15008)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()

    requests = read_trace(args.trace)
    timing = LatencyModel.load(args.profile)
    decision = LatencyModel.load(args.decision_profile or args.profile)
    estimates = None
    if args.job_log:
        with open_text(args.job_log) as f:
            jobs = {int(j["job_id"].rsplit("-", 1)[1]): j for j in map(json.loads, f)}
        missing = [i for i in range(len(requests)) if i not in jobs]
        if missing:
            raise SystemExit(f"--job-log lacks {len(missing)} of the trace's requests (first: {missing[0]})")
        requests = [replace(r, prompt_tokens=jobs[i]["prompt_tokens"]) for i, r in enumerate(requests)]
        if args.policy == "alise":
            estimates = {i: LengthEstimate(**jobs[i]["estimate"]) for i in range(len(requests))}
            print(f"alise estimates: the real scheduler's ({args.job_log})")
    elif args.policy == "alise":
        estimates, source = cross_fitted_estimates(requests, method="predictor")
        print(f"alise estimates: {source}")
    config = SimConfig(kv_tokens=args.kv_tokens, max_num_seqs=args.max_num_seqs,
                       scheduling=SchedulingConfig(policy=args.policy))
    result = simulate(rescale(requests, args.rate), timing, config, estimates=estimates, pricing=decision)
    sim = {int(r.job_id[1:]): r for r in result.records}
    with open_text(args.real) as f:
        real = {r["index"]: r for r in map(json.loads, f) if not r.get("error")}
    common = sorted(set(sim) & set(real), key=lambda i: (real[i]["output_tokens"], i))
    mean = statistics.fmean
    print(f"SIMULATED vs real, {args.policy} at {args.rate} req/s, {len(common)} requests; steps timed by "
          f"{timing.name}, decisions priced by {decision.name}")
    print(f"{'output tokens':>14} {'norm ms sim':>12} {'real':>7} {'e2e s sim':>10} {'real':>7} "
          f"{'ttft s sim':>11} {'real':>7}")
    size = -(-len(common) // 5)
    for part in [common[k:k + size] for k in range(0, len(common), size)] + [common]:
        label = ("all" if part is common else
                 f"{real[part[0]]['output_tokens']}-{real[part[-1]]['output_tokens']}")
        print(f"{label:>14} {1e3 * mean(sim[i].normalized_latency_s for i in part):>12.1f} "
              f"{1e3 * mean(real[i]['normalized_latency_s'] for i in part):>7.1f} "
              f"{mean(sim[i].e2e_s for i in part):>10.2f} {mean(real[i]['e2e_s'] for i in part):>7.2f} "
              f"{mean(sim[i].ttft_s for i in part):>11.2f} {mean(real[i]['ttft_s'] for i in part):>7.2f}")


if __name__ == "__main__":
    main()
