"""Simulated: how ALISE's prefill budget and chunk cap change first tokens under bursts (CPU).

Replays the side-by-side trace (bench/gpu/peer_prep.py) through the simulator (``alise.tools.sim``:
the scheduler core and the worker's engine, steps priced by a latency profile) with the
requests in the order and at the moments ``vllm bench serve --dataset-name custom --seed SEED
--request-rate R --burstiness B`` sends them (its shuffle of the data set and its Gamma gaps,
rescaled so the last request leaves at N / R, as vllm/benchmarks/serve.py does), for several
scheduler settings, fcfs at the same KV budget:

* ``alise``      the defaults: 256 tokens a step (or twice the sequences), chunks beside
                 decodes capped at 1.5x the decode step by the profile, two plans ahead while
                 they reach the worker in time, three once it runs out (never, simulated);
* ``3-ahead``    the defaults with three plans always in flight (the default before);
* ``no-cap``     the same budget, no cap (``--prefill-step-ratio 0``);
* ``8192-cap``   vLLM's budget on an H100 (8,192 tokens a step), the cap kept;
* ``vllm-like``  8,192 tokens a step, no cap (vLLM's chunked prefill), two plans in flight
                 (vLLM's async scheduling: one step queued behind the running one);
* ``1-ahead``    vllm-like with one plan in flight instead of two.

Per run: TTFT (from arrival to the end of the step that made the first token) mean, p50, p90,
p99; TPOT mean; the gaps between a request's tokens (ITL) p50 and p99; normalized latency mean;
output tokens per second over the makespan; steps; and the steps that carried prompt tokens.
The simulator sees no HTTP, streaming or client: these are the scheduling effects alone.

    python bench/gpu/peer_sim.py --trace .peercarry/trace.jsonl \
        --profile profiles/opt-13b-h200.json --rates 11,13,16,inf --variants alise,3-ahead

``ahead`` is the plans kept in flight while they reach the worker in time.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from alise.core import scheduler as core_scheduler
from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.trace import TraceRequest, read_trace

FCFS = SchedulingConfig(policy="fcfs")
#: name -> (max_num_batched_tokens (0: the worker's default rule), the scheduler's settings)
VARIANTS = {
    "alise": (0, FCFS),
    "3-ahead": (0, replace(FCFS, min_plans_ahead=3)),
    "no-cap": (0, replace(FCFS, prefill_step_ratio=0.0)),
    "8192-cap": (8192, FCFS),
    "vllm-like": (8192, replace(FCFS, prefill_step_ratio=0.0, plans_ahead=2)),
    "1-ahead": (8192, replace(FCFS, prefill_step_ratio=0.0, plans_ahead=1)),
}


def client_order(trace: list[TraceRequest], seed: int, rate: float, burstiness: float) -> list[TraceRequest]:
    """The requests as vLLM's client sends them: CustomDataset shuffles the rows with
    ``random.seed(seed)``; get_request draws a Gamma gap (shape ``burstiness``, mean 1 / rate)
    before each request from ``np.random.seed(seed)`` and rescales their sum to N / rate."""
    rows = list(trace)
    random.seed(seed)
    random.shuffle(rows)
    if rate == float("inf"):
        return [replace(r, arrival_s=0.0) for r in rows]
    np.random.seed(seed)
    theta = 1.0 / (rate * burstiness)
    delays = np.cumsum([np.random.gamma(shape=burstiness, scale=theta) for _ in rows])
    delays *= (len(rows) / rate) / delays[-1]
    return [replace(r, arrival_s=float(t)) for r, t in zip(rows, delays, strict=True)]


class TokenTimes(SchedulerCore):
    """The scheduler core, noting when each job's tokens arrive (for the gaps between them)."""

    times: dict[str, list[float]] = defaultdict(list)

    def apply_report(self, worker_id, report, now_s):
        events = super().apply_report(worker_id, report, now_s)
        for event in events:
            TokenTimes.times[event.job_id].extend([now_s] * len(event.token_ids))
        return events


def run(trace, latency: LatencyModel, variant: str, args) -> dict:
    budget, scheduling = VARIANTS[variant]
    ratio, ahead = scheduling.prefill_step_ratio, min(scheduling.min_plans_ahead, scheduling.plans_ahead)
    config = SimConfig(kv_tokens=args.kv_tokens, block_size=16, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=budget, max_model_len=args.max_model_len, scheduling=scheduling)
    TokenTimes.times = defaultdict(list)
    core_scheduler.SchedulerCore = TokenTimes  # the class alise.core.config.make_core builds
    try:
        result = simulate(trace, latency, config)
    finally:
        core_scheduler.SchedulerCore = SchedulerCore
    recs = result.records
    ttft = np.array([r.ttft_s for r in recs]) * 1e3
    tpot = [1e3 * (r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in recs if r.output_tokens > 1]
    gaps = np.concatenate([np.diff(t) for t in TokenTimes.times.values() if len(t) > 1]) * 1e3
    norm = [1e3 * r.normalized_latency_s for r in recs]
    first = min(r.arrival_s for r in recs)
    return dict(variant=variant, budget=config.capacity("w").max_num_batched_tokens, ratio=ratio, plans_ahead=ahead,
                ttft_ms=[float(ttft.mean())] + [float(np.percentile(ttft, q)) for q in (50, 90, 99)],
                tpot_ms=float(np.mean(tpot)), itl_ms=[float(np.percentile(gaps, q)) for q in (50, 99)],
                norm_ms=float(np.mean(norm)), tok_s=sum(r.output_tokens for r in recs) / (result.makespan_s - first),
                steps=result.num_steps, preemptions=sum(result.preemptions.values()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=".peercarry/trace.jsonl")
    p.add_argument("--profile", default="profiles/opt-13b-h100.json")
    p.add_argument("--rates", default="11,16,inf")
    p.add_argument("--burstiness", type=float, default=0.111)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--kv-tokens", type=int, default=938 * 16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scales", default="1", help="comma-separated factors on every step's time (the profile's "
                   "correction): how the same schedule fares on a faster or slower engine")
    p.add_argument("--json", default="")
    args = p.parse_args()
    trace = read_trace(args.trace)
    latency = LatencyModel.load(args.profile)
    rows = []
    print(f"SIMULATED, profile {latency.name} ({Path(args.profile).name}), {len(trace)} requests, fcfs, "
          f"{args.kv_tokens} KV tokens, {args.max_num_seqs} sequences, burstiness {args.burstiness}, seed {args.seed}")
    print(f"{'rate':>5} {'scale':>5} {'variant':<10} {'budget':>6} {'cap':>4} {'ahead':>5}  "
          "TTFT ms mean / p50 / p90 / p99"
          f"       TPOT  ITL p50 / p99  norm ms/tok  tok/s  steps  preempt")
    for rate_text in args.rates.split(","):
        rate = float(rate_text)
        ordered = client_order(trace, args.seed, rate, args.burstiness)
        for scale, variant in [(float(s), v) for s in args.scales.split(",") for v in args.variants.split(",")]:
            latency = LatencyModel.load(args.profile)
            latency.correction *= scale
            row = run(ordered, latency, variant, args) | dict(rate=rate, scale=scale)
            rows.append(row)
            t = row["ttft_ms"]
            print(f"{rate_text:>5} {scale:>5g} {variant:<10} {row['budget']:>6} {row['ratio'] or '-':>4} "
                  f"{row['plans_ahead']:>5}  "
                  f"{t[0]:6.0f} / {t[1]:5.0f} / {t[2]:6.0f} / {t[3]:6.0f}   {row['tpot_ms']:5.1f}  "
                  f"{row['itl_ms'][0]:5.1f} / {row['itl_ms'][1]:5.1f}  {row['norm_ms']:11.1f}  {row['tok_s']:5.0f}  "
                  f"{row['steps']:5d}  {row['preemptions']:7d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
