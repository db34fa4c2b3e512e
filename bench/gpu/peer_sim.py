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
* ``1-ahead``    vllm-like with one plan in flight instead of two;
* ``swap``       the defaults with ``--num-host-blocks`` host blocks and the adaptive KV planner
                 (a paused job's KV kept, int8, int4, swapped to the host or dropped, whichever
                 costs least; copies on one copy engine at ``--swap-gbps``, blocks of
                 ``--block-bytes``; the other variants move no KV off the device and price
                 nothing for a move);
* ``int8``       the defaults with the quantize planner (kept, int8, int4 or dropped, on the
                 device alone).

Each variant runs under every policy of ``--policies``: ``fcfs`` (vLLM v1's decisions), ``alise``
(shortest predicted remaining time first, ranked by the length predictor cross-fitted on the
trace, ``alise.tools.sim.predictions``: no request is predicted by a model that saw its own
output; cached beside the trace) and ``oracle`` (the true lengths).

Per run: TTFT (from arrival to the end of the step that made the first token) mean, p50, p90,
p99; TPOT mean; the gaps between a request's tokens (ITL) p50 and p99; normalized latency
(end-to-end over output tokens) mean and p99; output tokens per second over the makespan;
goodput (requests a second within ``--goodput-ttft-ms`` and ``--goodput-tpot-ms``, as vLLM's
client counts them); steps; preemptions; the prompt and output tokens that the drops left
in the worker's prefix cache, and of them those still there when the dropped jobs resumed; the
prompt tokens computed (recomputes after drops included); and the tail: from the last job's
first token to the end, the part of the makespan where only jobs already started run.
The simulator sees no HTTP, streaming or client: these are the scheduling effects alone.

    python bench/gpu/peer_sim.py --trace .peercarry/trace.jsonl \
        --profile profiles/opt-13b-h200.json --rates 11,13,16,inf --variants alise,3-ahead \
        --policies fcfs,alise

``ahead`` is the plans kept in flight while they reach the worker in time.

All at once, the output tokens per second are the trace's tokens over the makespan, and the
makespan is set by when the longest jobs start: an order that queues one of them last ends
seconds later. ``--queued-from`` replays a real run's order instead of the client's: the order,
and the moments, in which ALISE's scheduler queued the requests (what its HTTP door passed on):

    python bench/gpu/peer_sim.py --rates inf --seed 7 --variants alise \
        --queued-from results/logs/fcfs-mem-scheduler.log

``--order longest-first`` sends the same requests at the same moments, longest output first:
all at once, the bound on what any order (any policy) can buy the makespan.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from collections import defaultdict, deque
from dataclasses import replace
from pathlib import Path

import numpy as np
from peer_ttft import QUEUED

from alise.core import scheduler as core_scheduler
from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.simulator import SimConfig, simulate
from alise.tools.trace import TraceRequest, read_trace

FCFS = SchedulingConfig(policy="fcfs")
#: name -> (max_num_batched_tokens (0: the worker's default rule), the scheduler's settings,
#: the KV moves: "free" (no host blocks, quantizing costs no time: the simulator's default),
#: "device" (blocks of ``--block-bytes``, quantized at 345 GB/s, docs/benchmarks.md "KV
#: offload"), "host" (that and ``--num-host-blocks`` host blocks))
VARIANTS = {
    "alise": (0, FCFS, "free"),
    "3-ahead": (0, replace(FCFS, min_plans_ahead=3), "free"),
    "no-cap": (0, replace(FCFS, prefill_step_ratio=0.0), "free"),
    "8192-cap": (8192, FCFS, "free"),
    "vllm-like": (8192, replace(FCFS, prefill_step_ratio=0.0, plans_ahead=2), "free"),
    "1-ahead": (8192, replace(FCFS, prefill_step_ratio=0.0, plans_ahead=1), "free"),
    "swap": (0, replace(FCFS, kv_planner="adaptive"), "host"),
    "int8": (0, replace(FCFS, kv_planner="quantize"), "device"),
}
#: Bytes of one 16-token OPT-13B KV block at 16 bits: K and V, 40 layers, 5,120 channels.
OPT13B_BLOCK_BYTES = 2 * 40 * 5120 * 2 * 16
#: Orders of ``--order``: the client's, or its requests sorted by their true output length
#: (each keeps a slot of the client's arrival times): all at once, where the longest jobs
#: queue bounds the makespan.
ORDERS = ("client", "longest-first", "shortest-first")


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


def by_length(ordered: list[TraceRequest], order: str) -> list[TraceRequest]:
    """``ordered`` with its requests sorted by true output length (``order``: one of
    :data:`ORDERS`), each taking the arrival time of the slot it lands in."""
    if order == "client":
        return ordered
    rows = sorted(ordered, key=lambda r: r.output_tokens, reverse=order == "longest-first")
    return [replace(r, arrival_s=slot.arrival_s) for r, slot in zip(rows, ordered, strict=True)]


def queued_order(ordered: list[TraceRequest], log: Path) -> list[TraceRequest]:
    """The requests in the order and at the moments ALISE's scheduler queued them (its log's
    ``queued:`` lines; the last ``len(ordered)``: a set-up's log holds its runs in the order
    they ran, the all-at-once one last), each matched to a request by (prompt tokens,
    max_tokens), which vLLM's client sets to the trace's output tokens."""
    rows = []
    for line in log.open():
        if m := QUEUED.match(line):
            wall = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append((wall, int(m.group(3)), int(m.group(4))))
    if len(rows) < len(ordered):
        raise SystemExit(f"{log}: {len(rows)} queued requests, the trace has {len(ordered)}")
    rows = rows[-len(ordered):]
    pool: dict[tuple[int, int], deque] = defaultdict(deque)
    for r in ordered:
        pool[(r.prompt_tokens, r.output_tokens)].append(r)
    out = []
    for wall, prompt, max_tokens in rows:
        if not pool[(prompt, max_tokens)]:
            raise SystemExit(f"{log}: a request of {prompt} prompt tokens and max_tokens {max_tokens} "
                             "is not in the trace (or more often than there)")
        out.append(replace(pool[(prompt, max_tokens)].popleft(), arrival_s=wall - rows[0][0]))
    return out


class TokenTimes(SchedulerCore):
    """The scheduler core, noting when each job's tokens arrive (for the gaps between them)."""

    times: dict[str, list[float]] = defaultdict(list)

    def apply_report(self, worker_id, report, now_s):
        events = super().apply_report(worker_id, report, now_s)
        for event in events:
            TokenTimes.times[event.job_id].extend([now_s] * len(event.token_ids))
        return events


def run(trace, latency: LatencyModel, variant: str, policy: str, estimates, args) -> dict:
    budget, scheduling, moves = VARIANTS[variant]
    scheduling = replace(scheduling, policy=policy)
    ratio, ahead = scheduling.prefill_step_ratio, min(scheduling.min_plans_ahead, scheduling.plans_ahead)
    config = SimConfig(kv_tokens=args.kv_tokens, block_size=16, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=budget, max_model_len=args.max_model_len, scheduling=scheduling,
                       num_host_blocks=args.num_host_blocks if moves == "host" else 0,
                       block_bytes=0 if moves == "free" else args.block_bytes, swap_bytes_per_s=args.swap_gbps * 1e9,
                       quantize_bytes_per_s=345e9)
    TokenTimes.times = defaultdict(list)
    core_scheduler.SchedulerCore = TokenTimes  # the class alise.core.config.make_core builds
    try:
        result = simulate(trace, latency, config, estimates=estimates if policy == "alise" else None)
    finally:
        core_scheduler.SchedulerCore = SchedulerCore
    recs = result.records
    ttft = np.array([r.ttft_s for r in recs]) * 1e3
    # vLLM's client: a request of one output token has a TPOT of 0.
    tpot = np.array([1e3 * (r.finish_s - r.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
                     for r in recs])
    gaps = np.concatenate([np.diff(t) for t in TokenTimes.times.values() if len(t) > 1]) * 1e3
    norm = np.array([1e3 * r.normalized_latency_s for r in recs])
    first = min(r.arrival_s for r in recs)
    duration_s = result.makespan_s - first
    good = (ttft <= args.goodput_ttft_ms) & (tpot <= args.goodput_tpot_ms)
    return dict(variant=variant, policy=policy, budget=config.capacity("w").max_num_batched_tokens, ratio=ratio,
                plans_ahead=ahead, ttft_ms=[float(ttft.mean())] + [float(np.percentile(ttft, q)) for q in (50, 90, 99)],
                tpot_ms=float(tpot[tpot > 0].mean()), itl_ms=[float(np.percentile(gaps, q)) for q in (50, 99)],
                norm_ms=[float(norm.mean()), float(np.percentile(norm, 99))],
                tok_s=sum(r.output_tokens for r in recs) / duration_s, goodput=float(good.sum()) / duration_s,
                steps=result.num_steps, preemptions=sum(result.preemptions.values()),
                # from the last job's first token to the end: the drain, where memory no longer binds
                tail_s=result.makespan_s - max(r.first_token_s for r in recs),
                makespan_s=duration_s, computed=result.prefill.num_computed_tokens,
                drop_cached=result.prefill.num_drop_cached_tokens,
                resume_cached=result.prefill.num_resume_cached_tokens)


def alise_estimates(trace: list[TraceRequest], args) -> dict:
    """Cross-fitted length estimates by the trace's request id (their order differs by rate)."""
    from alise.tools.sim.predictions import cross_fitted_estimates, kendall_tau

    estimates, source = cross_fitted_estimates(trace, method=args.predictor, num_folds=args.folds,
                                               cache_path=f"{args.trace}.estimates-{args.predictor}.json")
    print(f"alise's estimates: {source}, Kendall tau {kendall_tau(estimates, trace):.3f}")
    return {trace[i].id: e for i, e in estimates.items()}


def mean_row(rows: list[dict]) -> dict:
    """The runs' figures averaged (the settings are the same in each)."""
    out = dict(rows[0])
    for key in rows[0]:
        if key not in ("variant", "policy", "budget", "ratio", "plans_ahead"):
            out[key] = np.array([r[key] for r in rows], dtype=float).mean(axis=0).tolist()
    return out


HEADER = (f"{'rate':>5} {'scale':>5} {'policy':<6} {'variant':<10} {'budget':>6} {'cap':>4} {'ahead':>5}  "
          "TTFT ms mean / p50 / p90 / p99     ITL p50 / p99   tok/s  goodput  norm ms/tok mean / p99  preempt"
          "  cached: drops > resumes  prefill computed  tail s / makespan s")


def row_line(rate_text: str, row: dict) -> str:
    t, n = row["ttft_ms"], row["norm_ms"]
    return (f"{rate_text:>5} {row['scale']:>5g} {row['policy']:<6} {row['variant']:<10} {row['budget']:>6} "
            f"{row['ratio'] or '-':>4} {row['plans_ahead']:>5}  "
            f"{t[0]:6.0f} / {t[1]:5.0f} / {t[2]:6.0f} / {t[3]:6.0f}   "
            f"{row['itl_ms'][0]:5.1f} / {row['itl_ms'][1]:5.1f}  "
            f"{row['tok_s']:6.0f}  {row['goodput']:7.2f}  {n[0]:8.1f} / {n[1]:8.1f}  {row['preemptions']:7.0f}  "
            f"{row['drop_cached']:8,.0f} > {row['resume_cached']:6,.0f}  {row['computed']:16,.0f}  "
            f"{row['tail_s']:6.1f} / {row['makespan_s']:10.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=".peercarry/trace.jsonl")
    p.add_argument("--profile", default="profiles/opt-13b-h100.json")
    p.add_argument("--rates", default="11,16,inf")
    p.add_argument("--burstiness", type=float, default=0.111)
    p.add_argument("--seed", default="7", help="the client's seed; several (comma-separated): each row is the "
                   "mean of the runs over them (one trace's tail is a few requests, so a change is judged over many)")
    p.add_argument("--kv-tokens", type=int, default=938 * 16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--policies", default="fcfs", help="comma-separated: fcfs, alise, oracle")
    p.add_argument("--predictor", default="auto", help="alise's estimates: auto, predictor or knn (cross-fitted)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of alise's estimates")
    p.add_argument("--goodput-ttft-ms", type=float, default=500.0)
    p.add_argument("--goodput-tpot-ms", type=float, default=50.0)
    p.add_argument("--scales", default="1", help="comma-separated factors on every step's time (the profile's "
                   "correction): how the same schedule fares on a faster or slower engine")
    p.add_argument("--queued-from", type=Path, default=None, help="ALISE's scheduler log of an all-at-once run: "
                   "rate inf replays the order and moments its scheduler queued the requests in (whatever the seed)")
    p.add_argument("--order", default="client", choices=ORDERS, help="the client's order, or its requests "
                   "sorted by true output length in the client's arrival times (a bound on what order buys)")
    p.add_argument("--num-host-blocks", type=int, default=4096, help="host KV blocks of the swap variant")
    p.add_argument("--block-bytes", type=int, default=OPT13B_BLOCK_BYTES, help="bytes of a 16-bit KV block "
                   "of the swap and int8 variants (the KV planner's prices, the copies' and quantizations' time)")
    p.add_argument("--swap-gbps", type=float, default=34.0, help="host copies' GB/s (docs/benchmarks.md, "
                   "KV offload: 33.9 out, 35.5 in on an H100)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    trace = read_trace(args.trace)
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - {"fcfs", "alise", "oracle"})
    if unknown:
        p.error(f"unknown policy {', '.join(unknown)}; choose from fcfs, alise, oracle")
    by_id = alise_estimates(trace, args) if "alise" in policies else {}
    latency = LatencyModel.load(args.profile)
    rows = []
    print(f"SIMULATED, profile {latency.name} ({Path(args.profile).name}), {len(trace)} requests, "
          f"{args.kv_tokens} KV tokens, {args.max_num_seqs} sequences, burstiness {args.burstiness}, "
          f"seed{'s (means)' if ',' in args.seed else ''} {args.seed}, "
          f"goodput TTFT {args.goodput_ttft_ms:g} ms, TPOT {args.goodput_tpot_ms:g} ms")
    print(HEADER)
    seeds = [int(seed) for seed in args.seed.split(",")]
    for rate_text in args.rates.split(","):
        rate = float(rate_text)
        orders = [by_length(client_order(trace, seed, rate, args.burstiness), args.order) for seed in seeds]
        if rate == float("inf") and args.queued_from:
            orders = [queued_order(ordered, args.queued_from) for ordered in orders]
            print(f"  inf: in the order and at the moments {args.queued_from} queued the requests")
        runs = [(float(s), v, pol) for s in args.scales.split(",")
                for v in args.variants.split(",") for pol in policies]
        for scale, variant, policy in runs:
            per_seed = []
            for ordered in orders:
                latency = LatencyModel.load(args.profile)
                latency.correction *= scale
                estimates = {i: by_id[r.id] for i, r in enumerate(ordered)} if by_id else None
                per_seed.append(run(ordered, latency, variant, policy, estimates, args))
            row = mean_row(per_seed) | dict(rate=rate, scale=scale, seeds=seeds)
            rows.append(row)
            print(row_line(rate_text, row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
