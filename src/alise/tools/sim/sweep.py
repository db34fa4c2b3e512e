"""Rate sweeps in the simulator, and the figures they are judged by.

* Normalized latency of a job: end-to-end seconds over output tokens; a run's figure is the
  mean over all its jobs (the metric of the vLLM and ALISE papers).
* Unloaded normalized latency: the same mean when every job runs alone (prefill, then one
  decode step per token), computed from the latency model; it is policy-independent.
* Throughput at constraint C: the highest request rate whose mean normalized latency is at
  most C, interpolated linearly between the last sweep rate under C and the first above it
  (on the first crossing). If no swept rate exceeds C the result is the highest rate swept,
  marked censored; if even the lowest rate exceeds C it is 0.
* Sustained: a finite trace in overload flatters every policy differently (a shortest-first
  policy keeps the mean low by leaving long jobs for the drain after the last arrival). A run
  is *sustained* when its work backlog (the trace's decode steps still to run, one an output
  token, as a share of all of them: :class:`alise.tools.sim.simulator.WorkMeter`) grows by at
  most ``MAX_WORK_BACKLOG_GROWTH`` over the second half of the arrivals (its mean over the last
  quarter of arrivals less its mean over the second quarter:
  :func:`alise.tools.sim.simulator.backlog_growth`), and its rate is at
  most the capacity bound below (a finite run a little above it can still grow its backlog
  slowly). Work in flight stays level in a run that keeps up, however many jobs run at once;
  in overload by a fraction x it grows by about x / (2 (1 + x)) of the trace's work over the
  second half of the arrivals. The work backlog does not depend on the order jobs are served
  in; a count of unfinished jobs does (shortest-first finishes many short jobs and leaves the
  long ones: a 15 % count rule passed runs at twice the capacity). Where memory binds, a
  shortest-first policy still works off more tokens a second than fcfs (short jobs decode
  from short contexts), so its backlog in tokens grows more slowly than the memory-time it
  leaves behind; the backlog in KV token-steps is reported beside it, and the capacity bound
  below caps what any policy is credited with.
  Steady-state figures count only sustained runs; *finite-trace* figures count every run, as
  the trace's mean says.
* Capacity bound: no policy that decodes from full-precision KV can finish the trace's work
  faster than its memory-time and the profile allow (:func:`capacity_bound`).
* Tail: the p99 normalized latency of the longest 5 % of jobs (by output length), the jobs a
  shortest-first policy could starve.

Each (policy, rate) run replays the same requests with arrivals rescaled to the rate, so a
sweep compares policies on identical work.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise

from alise.core.latency_model import LatencyModel
from alise.tools.sim.simulator import SimConfig, SimResult, decode_work, output_target
from alise.tools.trace import TraceRequest, rescale

#: Largest growth of a run's work backlog (share of the trace's work still to do) over the
#: second half of its arrivals for the run to count as sustained: about 5 % of overload.
MAX_WORK_BACKLOG_GROWTH = 0.025


@dataclass(frozen=True)
class RunSummary:
    policy: str
    rate: float
    mean_normalized_latency_s: float
    p99_longest5_normalized_latency_s: float
    mean_ttft_s: float
    mean_e2e_s: float
    throughput_req_s: float
    makespan_s: float
    num_requests: int
    num_steps: int
    num_preemptions: int
    wall_s: float
    backlog_at_last_arrival: float = 0.0
    work_backlog_at_last_arrival: float = 0.0
    work_backlog_growth: float = 0.0
    capacity_bound_req_s: float = math.inf
    kv_backlog_growth: float = 0.0
    #: Prompt tokens admitted to the workers, read from their prefix caches, computed by prefills.
    num_admitted_tokens: int = 0
    num_cached_tokens: int = 0
    num_prefill_tokens: int = 0
    p50_ttft_s: float = 0.0

    @property
    def sustained(self) -> bool:
        return (self.work_backlog_growth <= MAX_WORK_BACKLOG_GROWTH
                and self.rate <= self.capacity_bound_req_s)

    @property
    def constrained_latency_s(self) -> float:
        """Mean normalized latency, or infinity when the run was not sustained."""
        return self.mean_normalized_latency_s if self.sustained else math.inf


def unloaded_normalized_latency(requests: Sequence[TraceRequest], latency: LatencyModel,
                                max_model_len: int = 2048) -> float:
    total = 0.0
    for r in requests:
        out = max(min(r.output_tokens, max_model_len - r.prompt_tokens), 1)
        t = latency.step_s(1, r.prompt_tokens, (r.prompt_tokens,))
        # Decode steps k = 1..out-1 see contexts p+1 .. p+out-1: an arithmetic series.
        n = out - 1
        t += n * latency.step_s(1, 0) + latency.c_ctx_s * latency.correction * (
            n * r.prompt_tokens + n * (n + 1) / 2)
        total += t / out
    return total / len(requests)


def tail_p99(records, fraction: float = 0.05) -> float:
    ordered = sorted(records, key=lambda r: (r.output_tokens, r.job_id))
    tail = ordered[-max(1, math.ceil(len(ordered) * fraction)):]
    values = sorted(r.normalized_latency_s for r in tail)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def summarize(result: SimResult, rate: float, capacity_bound_req_s: float = math.inf) -> RunSummary:
    recs = result.records
    last = max(r.arrival_s for r in recs)
    return RunSummary(
        backlog_at_last_arrival=sum(1 for r in recs if r.finish_s > last) / len(recs),
        work_backlog_at_last_arrival=result.work_backlog_at_last_arrival,
        work_backlog_growth=result.work_backlog_growth, kv_backlog_growth=result.kv_backlog_growth,
        capacity_bound_req_s=capacity_bound_req_s,
        policy=result.policy, rate=rate,
        mean_normalized_latency_s=statistics.fmean(r.normalized_latency_s for r in recs),
        p99_longest5_normalized_latency_s=tail_p99(recs),
        mean_ttft_s=statistics.fmean(r.ttft_s for r in recs),
        mean_e2e_s=statistics.fmean(r.e2e_s for r in recs),
        throughput_req_s=len(recs) / result.makespan_s if result.makespan_s > 0 else 0.0,
        makespan_s=result.makespan_s, num_requests=len(recs), num_steps=result.num_steps,
        num_preemptions=sum(result.preemptions.values()), wall_s=result.wall_s,
        num_admitted_tokens=result.prefill.num_admitted_tokens, num_cached_tokens=result.prefill.num_cached_tokens,
        num_prefill_tokens=result.prefill.num_computed_tokens,
        p50_ttft_s=statistics.median(r.ttft_s for r in recs))


def throughput_at_constraint(rates: Sequence[float], latencies: Sequence[float],
                             bound: float) -> tuple[float, bool]:
    """(rate, censored): the highest rate whose latency stays <= bound (see module doc)."""
    points = sorted(zip(rates, latencies, strict=True))
    if not points:
        return 0.0, True
    if points[0][1] > bound:
        return 0.0, False
    for (r0, l0), (r1, l1) in pairwise(points):
        if l1 > bound:
            if math.isinf(l1):
                return r0, False
            return r0 + (r1 - r0) * (bound - l0) / (l1 - l0), False
    return points[-1][0], True


def estimate_capacity(requests: Sequence[TraceRequest], latency: LatencyModel,
                      config: SimConfig) -> float:
    """A rough saturation rate (req/s): a memory-full batch decoding, one token per step."""
    mean_out = statistics.fmean(r.output_tokens for r in requests)
    mean_prompt = statistics.fmean(r.prompt_tokens for r in requests)
    per_job = mean_prompt + mean_out / 2
    latency = config.kv_latency(latency)
    batch = max(1.0, min(config.max_num_seqs, config.kv_room_tokens / per_job))
    step = latency.step_s(int(batch), int(batch * per_job))
    return config.num_workers * batch / step / mean_out


def capacity_bound(requests: Sequence[TraceRequest], latency: LatencyModel,
                   config: SimConfig) -> float:
    """An upper bound (req/s) on the rate any policy sustains on this trace's work.

    Job j generates n = :func:`output_target` tokens and decodes its tokens 2..n from
    contexts p+1 .. p+n-1, so it needs at least M_j = sum of those contexts in KV
    token-steps and n-1 sequence-steps. A step holds at most ``kv_room_tokens`` of context
    (paused jobs, swapped or quantized, do not decode) and ``max_num_seqs`` sequences, so
    the trace needs S >= max(sum M / kv_room_tokens, sum (n-1) / max_num_seqs) steps, each
    costing at least c0 + cycle, plus the per-context, per-sequence and per-prompt-token
    terms of the profile for the work itself (a one-token prompt is fed as a decode row, with
    no prefill term; recompute, mixed-step and quadratic terms only add). Holds for a
    profile with non-negative terms."""
    max_len = min(config.max_model_len, config.num_device_blocks * config.block_size)
    mem = seq = prompt = 0.0
    for r in requests:
        n = output_target(r.prompt_tokens, r.output_tokens, config.max_tokens, max_len)
        mem += decode_work(r.prompt_tokens, n)
        seq += n - 1
        prompt += r.prompt_tokens if r.prompt_tokens > 1 else 0
    latency = config.kv_latency(latency)
    k = latency.correction
    steps = max(mem / config.kv_room_tokens, seq / config.max_num_seqs)
    seconds = (steps * (latency.c0_s * k + latency.c_cycle_s)
               + k * (latency.c_ctx_s * mem + latency.c_seq_s * seq + latency.c_pre_s * prompt))
    return config.num_workers * len(requests) / seconds if seconds > 0 else math.inf


@dataclass(frozen=True)
class SweepProgress:
    """Where one policy's sweep stands: the rate it runs (``rate_index`` of ``num_rates``) and
    the jobs of that run finished so far; ``done``: the sweep of this policy ended, after
    ``rate_index + 1`` rates (fewer than ``num_rates`` where it stopped past the constraints)."""

    policy: str
    rate: float
    rate_index: int
    num_rates: int
    num_finished: int
    num_jobs: int
    done: bool = False


#: Least time between two reports of one sweep (a child process's reports cross a pipe).
REPORT_INTERVAL_S = 0.25


def _reporter(report, policy: str, rate: float, index: int, num_rates: int, num_jobs: int):
    """``simulate``'s ``on_progress`` for one run: reports at once, then at most every
    ``REPORT_INTERVAL_S``."""
    last = -math.inf

    def on_progress(num_finished: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= REPORT_INTERVAL_S:
            last = now
            report(SweepProgress(policy, rate, index, num_rates, num_finished, num_jobs))

    return on_progress


def _run_one(args, on_progress=None) -> RunSummary:
    requests, latency_json, config, rate, estimates = args
    from alise.tools.sim.simulator import simulate

    latency = LatencyModel.from_json(latency_json)
    alise = config.scheduling.policy == "alise"
    result = simulate(rescale(requests, rate), latency, config, estimates=estimates if alise else None,
                      on_progress=on_progress)
    return summarize(result, rate, capacity_bound(requests, latency, config))


def _sweep_policy(args, report=None) -> list[RunSummary]:
    requests, latency_json, config, rates, estimates, stop_above_s = args
    policy = config.scheduling.policy
    out: list[RunSummary] = []
    over = 0
    for index, rate in enumerate(rates):
        on_progress = _reporter(report, policy, rate, index, len(rates), len(requests)) if report else None
        s = _run_one((requests, latency_json, config, rate, estimates), on_progress)
        out.append(s)
        over = over + 1 if stop_above_s and s.mean_normalized_latency_s > stop_above_s else 0
        if over >= 2:
            break
    return out


#: In a pool's child process: where its sweeps report (the parent's queue), or None.
_child_queue = None


def _init_child(queue) -> None:
    global _child_queue
    _child_queue = queue


def _sweep_policy_in_child(indexed_task) -> tuple[int, list[RunSummary]]:
    index, task = indexed_task
    return index, _sweep_policy(task, _child_queue.put if _child_queue is not None else None)


def _done(task, runs: list[RunSummary]) -> SweepProgress:
    requests, config, rates = task[0], task[2], task[3]
    return SweepProgress(config.scheduling.policy, runs[-1].rate, len(runs) - 1, len(rates), len(requests),
                         len(requests), True)


def sweep(requests: Sequence[TraceRequest], policies: Sequence[str], rates: Sequence[float],
          latency: LatencyModel, config: SimConfig, *, estimates=None,
          stop_above_s: float | None = None, jobs: int = 1, progress=None) -> list[RunSummary]:
    """Runs every policy at every rate (ascending), each with ``config.scheduling``'s knobs
    under its own name; a policy stops after two consecutive rates above ``stop_above_s`` (its
    curve is past every constraint of interest, sustained or not).
    ``jobs`` > 1 runs policies in parallel processes; results do not depend on it.
    ``progress``, if given, is called in this process with a :class:`SweepProgress` as runs go
    (at most every ``REPORT_INTERVAL_S`` per policy), and once with ``done`` when a policy's
    sweep ends."""
    tasks = [(list(requests), latency.to_json(), with_policy(config, p), sorted(rates), estimates,
              stop_above_s) for p in policies]
    if jobs > 1 and len(tasks) > 1:
        results = _sweep_in_pool(tasks, min(jobs, len(tasks)), progress)
    else:
        results = []
        for t in tasks:
            results.append(_sweep_policy(t, progress))
            if progress:
                progress(_done(t, results[-1]))
    return [s for per_policy in results for s in per_policy]


def with_policy(config: SimConfig, policy: str) -> SimConfig:
    """``config`` with the policy ``policy`` (checked) and the same knobs."""
    return replace(config, scheduling=replace(config.scheduling, policy=policy))


def _sweep_in_pool(tasks: list, num_processes: int, progress) -> list[list[RunSummary]]:
    """One policy a process; the children's reports come through a queue, read between results.

    NOTE: a ``SimpleQueue``'s ``put`` writes to the pipe before it returns (no feeder thread), so
    every report of a policy is in the pipe before its result is: draining after each result
    delivers them all before the policy's ``done``."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    reports = ctx.SimpleQueue() if progress else None
    results: list = [None] * len(tasks)
    with ctx.Pool(num_processes, initializer=_init_child, initargs=(reports,)) as pool:
        pending = pool.imap_unordered(_sweep_policy_in_child, list(enumerate(tasks)))
        for _ in tasks:
            while True:
                try:
                    index, runs = pending.next(timeout=0.1 if progress else None)
                    break
                except multiprocessing.TimeoutError:
                    _drain(reports, progress)
            _drain(reports, progress)
            results[index] = runs
            if progress:
                progress(_done(tasks[index], runs))
    return results


def _drain(reports, progress) -> None:
    while reports is not None and not reports.empty():
        progress(reports.get())


def as_dict(summary: RunSummary) -> dict:
    return asdict(summary)
