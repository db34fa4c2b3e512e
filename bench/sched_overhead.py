"""Scheduler overhead: one SchedulerCore.schedule decision with ~1,000 queued and 256 running jobs.

    python bench/sched_overhead.py [--policies fcfs,alise,oracle] [--steps 300] [--no-phases]

Drives the core lock-step against a virtual worker (the worker's engine over a latency
model): 256 jobs run, ~1,000 wait, and new jobs arrive as old ones finish so the queue stays
at that size. ``schedule`` is timed (every phase: candidates, rank, select, memory planning,
start, advance), per step; the median, the 90th percentile and the maximum are printed. The
other core calls of a step (``apply_report`` and the ``submit`` of the new arrivals, where the
job table is also kept up to date) are timed separately ("rest"), so that no work hides
outside the timed call. The 1-minute load average is printed before and after: the machine
is shared, compare only quiet runs. A second run per policy times each phase of
``StepPlanner.schedule`` on its own (medians; the timers add a little to each), unless
``--no-phases``. A script that reports figures, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

from alise.core.blocks import WorkerCapacity
from alise.core.build import make_core
from alise.core.config import SchedulingConfig
from alise.core.job import Job, JobStatus, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.sampling import SamplingParams
from alise.tools.sim.virtual_worker import virtual_worker

#: The phases of ``StepPlanner.schedule``, in order.
PHASES = ("_candidates", "_rank", "_needs", "_select", "_plan_memory", "_start", "_advance")


def time_phases(planner, phases: dict[str, list[float]]) -> Callable[[], None]:
    """Wraps the planner's phases (on the instance) with timers that add to ``phases``; returns
    what closes a step (each phase's seconds of that step appended)."""
    step: dict[str, float] = defaultdict(float)

    def timed(name: str, method):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                step[name] += time.perf_counter() - t0
        return call

    for name in PHASES:
        setattr(planner, name, timed(name, getattr(planner, name)))

    def close() -> None:
        for name in PHASES:
            phases[name].append(step.pop(name, 0.0))
    return close


#: Steps run before the timed ones: chunked prefill admits the first jobs over a few dozen
#: steps (the token budget); the timed steps start once the batch is full.
WARMUP_STEPS = 60


def run(policy_name: str, *, num_running: int, num_queued: int, steps: int, seed: int,
        rest: list[float] | None = None, phases: dict[str, list[float]] | None = None):
    rng = random.Random(seed)
    latency = LatencyModel.load("profiles/opt-13b-h100-roofline.json")
    block_size = 16
    num_blocks = num_running * 48  # 768 tokens per running job: memory does not bind here
    core = make_core(SchedulingConfig(policy=policy_name), latency)
    core.add_worker(WorkerCapacity("w0", block_size, num_blocks, 0, 2048, num_running, 2 * num_running))
    close_step = time_phases(core.planner, phases) if phases is not None else None
    worker = virtual_worker(num_device_blocks=num_blocks, block_size=block_size,
                            max_model_len=2048, latency=latency)
    sampling = SamplingParams(max_tokens=2048, ignore_eos=True)
    counter = 0
    now = 0.0

    def submit(n: int) -> None:
        nonlocal counter
        for _ in range(n):
            out = rng.randint(20, 400)
            pred = max(1.0, out * rng.lognormvariate(0, 0.5))
            job_id = f"j{counter}"
            counter += 1
            core.submit(Job(job_id, [1] * rng.randint(8, 128), sampling, arrival_s=now,
                            estimate=LengthEstimate(pred, pred, pred * 1.8, "bench"),
                            oracle_output_tokens=out))

    submit(num_running + num_queued)
    timings = []
    running: list[int] = []
    for step in range(steps):
        t0 = time.perf_counter()
        plan = core.schedule("w0", now)
        timings.append(time.perf_counter() - t0)
        if close_step is not None:
            close_step()
        report = worker.run(plan)
        now += report.step_duration_s or 0.01
        t1 = time.perf_counter()
        core.apply_report("w0", report, now)
        submit(num_running + num_queued - len(core.jobs))
        if rest is not None and step >= WARMUP_STEPS:
            rest.append(time.perf_counter() - t1)
            running.append(core.num_with_status(JobStatus.RUNNING))
    queued = len(core.waiting)
    if phases is not None:
        for name in PHASES:
            del phases[name][:WARMUP_STEPS]
    return timings[WARMUP_STEPS:], statistics.median(running) if running else 0, queued


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--policies", default="fcfs,alise,oracle")
    p.add_argument("--steps", type=int, default=300,
                   help=f"steps to run, the first {WARMUP_STEPS} untimed (the batch fills)")
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--queued", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase run")
    args = p.parse_args()
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must be more than the {WARMUP_STEPS} untimed warm-up steps, got {args.steps}")
    print(f"SchedulerCore.schedule with {args.running} running and ~{args.queued} queued "
          f"jobs, {args.steps} steps (this machine, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}):")
    print(f"  {'policy':<8}{'median ms':>10}{'p90 ms':>9}{'max ms':>9}{'rest ms':>9}"
          "  (median running / queued at end)")
    for policy in args.policies.split(","):
        rest: list[float] = []
        t, running, queued = run(policy, num_running=args.running, num_queued=args.queued,
                                 steps=args.steps, seed=args.seed, rest=rest)
        ms = sorted(x * 1e3 for x in t)
        print(f"  {policy:<8}{statistics.median(ms):10.3f}{ms[int(0.9 * len(ms))]:9.3f}{ms[-1]:9.3f}"
              f"{statistics.median(rest) * 1e3:9.3f}  ({running:.0f} / {queued})")
    print(f"  (rest = median apply_report + submit per step; load average now "
          f"{os.getloadavg()[0]:.2f})")
    if not args.no_phases:
        print_phases(args)
    return 0


def print_phases(args: argparse.Namespace) -> None:
    print("Median microseconds per phase of StepPlanner.schedule (a second run, each phase timed):")
    print("  " + f"{'policy':<8}" + "".join(f"{name.strip('_'):>12}" for name in PHASES))
    for policy in args.policies.split(","):
        phases: dict[str, list[float]] = defaultdict(list)
        run(policy, num_running=args.running, num_queued=args.queued, steps=args.steps, seed=args.seed,
            phases=phases)
        print("  " + f"{policy:<8}" + "".join(f"{statistics.median(phases[name]) * 1e6:12.1f}"
                                             for name in PHASES))


if __name__ == "__main__":
    sys.exit(main())
