"""Factories for pure-core tests: a core, a virtual worker (the worker's engine over a latency
model), jobs, and a lock-step driver."""

from __future__ import annotations

from alise.core.blocks import WorkerCapacity
from alise.core.commands import AbortJobs, StepPlan
from alise.core.config import SchedulingConfig
from alise.core.dispatch import keep_in_flight
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import make_policy
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import virtual_worker
from alise.worker.engine import WorkerEngine

LATENCY = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, name="test")


def make_scheduler(policy: str = "fcfs", *, num_blocks: int = 6, block_size: int = 16,
                   max_num_seqs: int = 8, max_num_batched_tokens: int = 4096,
                   max_model_len: int = 2048, targets: dict[str, int] | None = None,
                   **policy_kwargs) -> tuple[SchedulerCore, WorkerEngine]:
    core = SchedulerCore(make_policy(SchedulingConfig(policy=policy, **policy_kwargs), LATENCY))
    core.add_worker(WorkerCapacity("w0", block_size, num_blocks, 0, max_model_len, max_num_seqs,
                                   max_num_batched_tokens))
    worker = virtual_worker(num_device_blocks=num_blocks, block_size=block_size,
                            max_model_len=max_model_len, latency=LATENCY, target_lengths=targets)
    return core, worker


def make_job(job_id: str, prompt_len: int, max_tokens: int = 64, arrival_s: float = 0.0,
             predicted: float | None = None, oracle: int | None = None) -> Job:
    estimate = None
    if predicted is not None:
        estimate = LengthEstimate(predicted, predicted, predicted * 1.5, "test")
    return Job(job_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
               arrival_s=arrival_s, estimate=estimate, oracle_output_tokens=oracle)


def step(core: SchedulerCore, worker: WorkerEngine, now_s: float = 0.0, worker_id: str = "w0"):
    """One lock-step round (``keep_in_flight`` with one plan): aborts to the virtual worker,
    then a plan run there and reported back. Returns (plan, events), an empty plan when there
    was nothing to do."""
    plan = StepPlan(step_id=0)
    for message in keep_in_flight(core, worker_id, now_s, plans_ahead=1):
        match message:
            case AbortJobs(job_ids, through):
                worker.abort(job_ids, through)
            case StepPlan():
                plan = message
    if plan.is_empty:
        return plan, []
    report = worker.run(plan)
    overcommitted = [r for r in report.refused if r.command in ("step", "chunk")]
    assert not overcommitted, f"the plan overcommitted the worker: {overcommitted}"
    events = core.apply_report(worker_id, report, now_s)
    return plan, events


def candidates_of(core: SchedulerCore, *job_ids: str):
    """The policy's view (``alise.core.policy.Candidates``) of the given jobs of ``core``."""
    import numpy as np

    return core.table.candidates(np.array([core.table.slot_of[j] for j in job_ids], dtype=np.int64))


def keys_of(policy, jobs, now_s: float):
    """The policy's keys of ``jobs`` as a step would compute them (a fresh job table)."""
    import numpy as np

    from alise.core.policy import RemainingTimeEstimator
    from alise.core.table import WAITING, JobTable

    table = JobTable(RemainingTimeEstimator(policy.latency or LATENCY, overrun_growth=policy.overrun_growth))
    for job in jobs:
        table.put(job, WAITING, policy.estimate_of(job))
    slots = np.array([table.slot_of[job.job_id] for job in jobs], dtype=np.int64)
    cands = table.candidates(slots)
    return policy.keys(cands, now_s).tolist(), cands


def key_of(policy, job, now_s: float) -> float:
    return keys_of(policy, [job], now_s)[0][0]


def is_starved(policy, job, now_s: float) -> bool:
    return bool(policy.starved(keys_of(policy, [job], now_s)[1], now_s)[0])
