"""Scheduler overhead: one SchedulerCore.schedule decision with ~1,000 queued and 256 running jobs.

    python bench/sched_overhead.py [--policies fcfs,alise,oracle] [--steps 300]

Drives the core lock-step against a virtual worker (the worker's engine over a latency
model): 256 jobs run, ~1,000 wait, and new jobs arrive as old ones finish so the queue stays
at that size. ``schedule`` is timed (every phase: candidates, rank, select, memory planning,
start, advance), per step; the median, the 90th percentile and the maximum are printed. The
other core calls of a step (``apply_report`` and the ``submit`` of the new arrivals, where the
job table is also kept up to date) are timed separately ("rest"), so that no work hides
outside the timed call. The 1-minute load average is printed before and after: the machine
is shared, compare only quiet runs. A script that reports figures, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from alise.core.blocks import WorkerCapacity
from alise.core.build import make_core
from alise.core.config import SchedulingConfig
from alise.core.job import Job, JobStatus, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.sampling import SamplingParams
from alise.tools.sim.virtual_worker import virtual_worker


def run(policy_name: str, *, num_running: int, num_queued: int, steps: int, seed: int,
        rest: list[float] | None = None):
    rng = random.Random(seed)
    latency = LatencyModel.load("profiles/opt-13b-h100-roofline.json")
    block_size = 16
    num_blocks = num_running * 48  # 768 tokens per running job: memory does not bind here
    core = make_core(SchedulingConfig(policy=policy_name), latency)
    core.add_worker(WorkerCapacity("w0", block_size, num_blocks, 0, 2048, num_running, 2 * num_running))
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
    # Chunked prefill admits the first jobs over a few dozen steps (the token budget):
    # the timed steps start once the batch is full.
    warmup = 60
    for step in range(steps):
        t0 = time.perf_counter()
        plan = core.schedule("w0", now)
        timings.append(time.perf_counter() - t0)
        report = worker.run(plan)
        now += report.step_duration_s or 0.01
        t1 = time.perf_counter()
        core.apply_report("w0", report, now)
        submit(num_running + num_queued - len(core.jobs))
        if rest is not None and step >= warmup:
            rest.append(time.perf_counter() - t1)
            running.append(core.num_with_status(JobStatus.RUNNING))
    queued = len(core.waiting)
    return timings[warmup:], statistics.median(running), queued


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--policies", default="fcfs,alise,oracle")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--queued", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
