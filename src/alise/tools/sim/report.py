"""`alise sim`: sweep rates x policies per workload, print the tables, write JSON and a PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from alise.core.latency_model import LatencyModel
from alise.tools.sim.profiles import opt13b_h100_roofline, profile_label, tensor_parallel_from_args
from alise.tools.sim.progress import ProgressLine
from alise.tools.sim.simulator import SimConfig
from alise.tools.sim.sweep import (
    MAX_WORK_BACKLOG_GROWTH,
    SweepProgress,
    as_dict,
    capacity_bound,
    estimate_capacity,
    sweep,
    tail_p99,
    throughput_at_constraint,
    unloaded_normalized_latency,
    with_policy,
)

#: Default sweep: these multiples of the estimated saturation rate.
RATE_FRACTIONS = (0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)
CONSTRAINTS = (2.0, 5.0)
MEASURED_PROFILE = "profiles/opt-13b-h100.json"

__all__ = ["run_sim_command", "load_profile", "tail_p99"]


def load_profile(path: str | None) -> LatencyModel:
    if path:
        return LatencyModel.load(path)
    if os.path.isfile(MEASURED_PROFILE):
        return LatencyModel.load(MEASURED_PROFILE)
    return opt13b_h100_roofline()


class SweepDisplay:
    """The progress line of one workload's sweep: each running policy's rate and jobs finished,
    runs done of all, elapsed; and a line per policy whose sweep ended."""

    def __init__(self, line: ProgressLine, workload: str, policies: list[str], num_rates: int) -> None:
        self.line = line
        self.workload = workload
        self.policies = policies
        self.num_runs = len(policies) * num_rates
        self.started = time.monotonic()
        self.latest: dict[str, SweepProgress] = {}
        self.done: dict[str, SweepProgress] = {}

    def _order(self, p: SweepProgress) -> int:
        return self.policies.index(p.policy)

    def __call__(self, p: SweepProgress) -> None:
        if p.policy in self.done:
            return  # a late report from the process that ran it
        elapsed = time.monotonic() - self.started
        if p.done:
            self.done[p.policy] = p
            self.latest.pop(p.policy, None)
            stopped = "" if p.rate_index + 1 == p.num_rates else " (stopped: past every constraint)"
            self.line.phase(f"sim {self.workload}: {p.policy} swept {p.rate_index + 1} of {p.num_rates} "
                            f"rates in {elapsed:.1f} s{stopped}")
            return
        self.latest[p.policy] = p
        running = " | ".join(f"{q.policy} rate {q.rate_index + 1}/{q.num_rates} ({q.rate:g} req/s) "
                             f"{q.num_finished}/{q.num_jobs} jobs"
                             for q in sorted(self.latest.values(), key=self._order))
        runs_done = sum(q.rate_index + 1 for q in self.done.values()) + sum(
            q.rate_index for q in self.latest.values())
        self.line.update(f"sim {self.workload}: {running} | {runs_done} of <={self.num_runs} runs done"
                         f" | {elapsed:.0f} s")


def workload_results(name: str, requests, latency: LatencyModel, config: SimConfig,
                     policies: list[str], rates: list[float] | None, estimates, jobs: int,
                     progress: ProgressLine | None = None) -> dict:
    unloaded = unloaded_normalized_latency(requests, latency, config.max_model_len)
    capacity = estimate_capacity(requests, latency, config)
    rates = rates or [round(capacity * f, 3) for f in RATE_FRACTIONS]
    started = time.perf_counter()
    display = SweepDisplay(progress, name, policies, len(rates)) if progress else None
    runs = sweep(requests, policies, rates, latency, config, estimates=estimates,
                 stop_above_s=2 * max(CONSTRAINTS) * unloaded,
                 jobs=jobs, progress=display)
    wall = time.perf_counter() - started
    per_policy = {p: [r for r in runs if r.policy == p] for p in policies}
    constraints = {}
    for factor in CONSTRAINTS:
        bound = factor * unloaded
        entry = {}
        for p, rs in per_policy.items():
            rate, censored = throughput_at_constraint(
                [r.rate for r in rs], [r.constrained_latency_s for r in rs], bound)
            finite, finite_censored = throughput_at_constraint(
                [r.rate for r in rs], [r.mean_normalized_latency_s for r in rs], bound)
            entry[p] = dict(throughput_req_s=rate, censored=censored,
                            finite_trace_req_s=finite, finite_trace_censored=finite_censored)
        constraints[f"{factor:g}x"] = dict(
            bound_s=bound, policies=entry, ratios=_ratios(entry, "throughput_req_s"),
            finite_trace_ratios=_ratios(entry, "finite_trace_req_s"))
    # Tail at a common load: the highest swept rate at which FCFS still meets 5x.
    tail = {}
    if "fcfs" in per_policy:
        ok = [r.rate for r in per_policy["fcfs"]
              if r.constrained_latency_s <= max(CONSTRAINTS) * unloaded]
        tail_rate = max(ok) if ok else min(rates)
        for p, rs in per_policy.items():
            hit = [r for r in rs if r.rate == tail_rate]
            if hit:
                tail[p] = hit[0].p99_longest5_normalized_latency_s
        tail = dict(rate=tail_rate, p99_longest5_normalized_latency_s=tail)
    return dict(workload=name, num_requests=len(requests),
                arrival_span_s={f"{r:g}": len(requests) / r for r in rates},
                unloaded_normalized_latency_s=unloaded, estimated_capacity_req_s=capacity,
                capacity_bound_req_s=capacity_bound(requests, latency, config),
                max_work_backlog_growth=MAX_WORK_BACKLOG_GROWTH,
                rates=rates, constraints=constraints, tail=tail, wall_s=wall,
                runs=[dict(as_dict(r), sustained=r.sustained) for r in runs])


def _ratios(entry: dict, key: str) -> dict:
    out = {}
    for a, b in (("alise", "fcfs"), ("alise", "oracle")):
        if a in entry and b in entry and entry[b][key] > 0:
            out[f"{a}/{b}"] = entry[a][key] / entry[b][key]
    return out


def format_workload(res: dict, profile: str) -> str:
    u = res["unloaded_normalized_latency_s"]
    lines = [f"== {res['workload']}: SIMULATED, profile {profile}; {res['num_requests']} requests "
             f"per run (arrival span = {res['num_requests']} / rate), unloaded normalized latency "
             f"{u * 1e3:.2f} ms/token; sweep took {res['wall_s']:.1f} s =="]
    policies = list(next(iter(res["constraints"].values()))["policies"])
    lines.append("mean normalized latency (x unloaded) by rate:")
    lines.append("  rate req/s  " + "".join(f"{p:>10}" for p in policies))
    for rate in res["rates"]:
        cells = []
        for p in policies:
            hit = [r for r in res["runs"] if r["policy"] == p and r["rate"] == rate]
            mark = "" if not hit or hit[0]["sustained"] else "*"
            cells.append(f"{hit[0]['mean_normalized_latency_s'] / u:9.2f}{mark or ' '}"
                         if hit else f"{'-':>10}")
        lines.append(f"  {rate:10.2f}  " + "".join(cells))
    for title, key, ratio_key in (
            ("steady state: sustained runs only", "throughput_req_s", "ratios"),
            ("finite trace: every run, as its mean says", "finite_trace_req_s", "finite_trace_ratios")):
        lines.append(f"throughput at latency constraint (req/s), {title}:")
        lines.append("  constraint  " + "".join(f"{p:>10}" for p in policies) +
                     "  alise/fcfs  alise/oracle")
        censored = "censored" if key == "throughput_req_s" else "finite_trace_censored"
        for name, c in res["constraints"].items():
            cells = "".join(
                f"{c['policies'][p][key]:9.2f}{'+' if c['policies'][p][censored] else ' '}"
                for p in policies)
            r = c[ratio_key]
            lines.append(f"  {name:>4} ({c['bound_s'] * 1e3:5.1f} ms) {cells}"
                         f"  {r.get('alise/fcfs', float('nan')):10.2f}"
                         f"  {r.get('alise/oracle', float('nan')):12.2f}")
    lines.append(format_prefix_cache(res["runs"]))
    lines.append(f"capacity bound (no policy sustains more; memory-time and the profile): "
                 f"{res['capacity_bound_req_s']:.2f} req/s")
    if res["tail"]:
        t = res["tail"]
        fc = t["p99_longest5_normalized_latency_s"].get("fcfs")
        cells = ", ".join(f"{p} {v / u:.1f}x" + (f" ({v / fc:.2f} of fcfs)" if fc and p != "fcfs" else "")
                          for p, v in t["p99_longest5_normalized_latency_s"].items())
        lines.append(f"p99 normalized latency of the longest 5 % at {t['rate']:.2f} req/s "
                     f"(fcfs's highest rate within 5x), x unloaded: {cells}")
    lines.append(f"('*' = not sustained: the decode steps still to run grew by over "
                 f"{res['max_work_backlog_growth']:.1%} of the trace's over the second half of the "
                 "arrivals, or a rate above the capacity bound; violates every steady-state constraint. "
                 "'+' = censored: never crossed the bound)")
    return "\n".join(lines)


def format_prefix_cache(runs: list[dict]) -> str:
    """Per policy, over its runs: the share of admitted prompt tokens the prefix caches held and
    the prefill tokens computed (a run's counts include recomputes after dropped KV)."""
    cells = []
    for p in dict.fromkeys(r["policy"] for r in runs):
        mine = [r for r in runs if r["policy"] == p]
        admitted = sum(r["num_admitted_tokens"] for r in mine)
        cached = sum(r["num_cached_tokens"] for r in mine)
        computed = sum(r["num_prefill_tokens"] for r in mine)
        cells.append(f"{p} {cached / admitted if admitted else 0.0:.1%} ({computed:,} of {admitted:,} computed)")
    return "prefix cache hit rate, prefill tokens computed of prompt tokens admitted (all rates): " + ", ".join(cells)


def plot(results: list[dict], profile: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        u = res["unloaded_normalized_latency_s"]
        for p in next(iter(res["constraints"].values()))["policies"]:
            rs = [r for r in res["runs"] if r["policy"] == p]
            ax.plot([r["rate"] for r in rs], [r["mean_normalized_latency_s"] * 1e3 for r in rs],
                    marker="o", label=p)
        for factor in (2, 5):
            ax.axhline(factor * u * 1e3, ls="--", lw=0.8, color="gray")
            ax.text(min(res["rates"]), factor * u * 1e3, f" {factor}x unloaded", va="bottom",
                    fontsize=8, color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("mean normalized latency (ms/token)")
        ax.set_title(f"{res['workload']} ({res['num_requests']} req), SIMULATED", fontsize=10)
        ax.legend()
    fig.suptitle(f"simulated; profile: {profile}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sim_config(args) -> tuple[SimConfig, list[str]]:
    """The simulated cluster and the policies to sweep that ``args`` give; ValueError naming
    the setting for a bad one."""
    from alise.tools.sim.flags import scheduling_from_args

    scheduling = scheduling_from_args(args)
    shape = {name: getattr(args, name) for name in ("kv_tokens", "num_workers", "max_num_seqs", "kv_cache_dtype",
                                                    "enable_prefix_caching")
             if getattr(args, name, None) is not None}
    config = SimConfig(**shape, scheduling=scheduling)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        with_policy(config, policy)
    return config, policies


def _rates(text: str | None) -> list[float] | None:
    """``--rates``: positive numbers, comma-separated; ValueError naming a bad one."""
    if not text:
        return None
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"rates must be numbers separated by commas, got {text!r}") from None
    for rate in rates:
        if not rate > 0:
            raise ValueError(f"rates must be > 0, got {rate:g}")
    return rates


def run_sim_command(args) -> int:
    from alise.common.entrypoint import config_argv
    from alise.tools.sim.flags import SCHEDULING_FLAGS
    from alise.tools.sim.predictions import cross_fitted_estimates, kendall_tau
    from alise.tools.trace import read_trace

    try:
        config, policies = sim_config(args)
        rates = _rates(args.rates)
    except ValueError as exc:
        print(f"alise sim: {exc}", file=sys.stderr)
        return 2
    try:
        latency = tensor_parallel_from_args(load_profile(args.profile), args)
    except (ValueError, OSError) as exc:
        print(f"alise sim: {exc}", file=sys.stderr)
        return 2
    label = profile_label(latency)
    knobs = " ".join(config_argv(config.scheduling, SCHEDULING_FLAGS))
    progress = ProgressLine.for_flag(getattr(args, "progress", None))
    results = []
    for path in args.trace:
        try:
            requests = read_trace(path)
        except (ValueError, OSError) as exc:
            print(f"alise sim: {exc}", file=sys.stderr)
            return 2
        estimates, source, tau = None, None, None
        if "alise" in policies:
            progress.update(f"sim {Path(path).stem}: alise's estimates ({args.predictor}, "
                            f"{args.folds} folds)")
            started = time.monotonic()
            estimates, source = cross_fitted_estimates(
                requests, method=args.predictor, num_folds=args.folds,
                cache_path=f"{path}.estimates-{args.predictor}.json")
            tau = kendall_tau(estimates, requests)
            progress.phase(f"sim {Path(path).stem}: alise's estimates in {time.monotonic() - started:.1f} s")
        res = workload_results(Path(path).stem, requests, latency, config, policies, rates,
                               estimates, args.jobs, progress)
        res.update(trace=path, predictions=source, kendall_tau=tau)
        results.append(res)
        progress.clear()
        print(format_workload(res, label))
        if knobs:
            print(f"scheduling (beside the defaults): {knobs}")
        if source:
            print(f"alise estimates: {source}; Kendall tau vs true lengths {tau:.3f}")
        print()
    png = args.png or (os.path.splitext(args.json_path or args.trace[0])[0] + ".png")
    plot(results, label, png)
    print(f"plot: {png}")
    if args.json_path:
        doc = dict(label="simulated", profile=label, profile_meta=latency.meta,
                   config=dict(kv_tokens=config.kv_tokens, kv_cache_dtype=config.kv_cache_dtype,
                               block_size=config.block_size, enable_prefix_caching=config.enable_prefix_caching,
                               max_num_seqs=config.max_num_seqs, num_workers=config.num_workers,
                               max_model_len=config.max_model_len, scheduling=asdict(config.scheduling)),
                   constraints_x_unloaded=list(CONSTRAINTS), workloads=results)
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(doc, indent=1))
        print(f"json: {args.json_path}")
    return 0
