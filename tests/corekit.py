"""Factories for pure-core tests: a core, a virtual worker, jobs, and a lock-step driver."""

from __future__ import annotations

from alise.core.blocks import WorkerCapacity
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import make_policy
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.sim.virtual_worker import VirtualWorker

LATENCY = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4, name="test")


def make_scheduler(policy: str = "fcfs", *, num_blocks: int = 6, block_size: int = 16,
                   max_num_seqs: int = 8, max_num_batched_tokens: int = 4096,
                   max_model_len: int = 2048, targets: dict[str, int] | None = None,
                   **policy_kwargs) -> tuple[SchedulerCore, VirtualWorker]:
    core = SchedulerCore(make_policy(policy, LATENCY, **policy_kwargs))
    core.add_worker(WorkerCapacity("w0", block_size, num_blocks, 0, max_model_len, max_num_seqs,
                                   max_num_batched_tokens))
    worker = VirtualWorker(num_device_blocks=num_blocks, block_size=block_size,
                           max_model_len=max_model_len, latency=LATENCY, target_lengths=targets)
    return core, worker


def make_job(job_id: str, prompt_len: int, max_tokens: int = 64, arrival_s: float = 0.0,
             predicted: float | None = None, oracle: int | None = None) -> Job:
    estimate = None
    if predicted is not None:
        estimate = LengthEstimate(predicted, predicted, predicted * 1.5, "test")
    return Job(job_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
               arrival_s=arrival_s, estimate=estimate, oracle_output_tokens=oracle)


def step(core: SchedulerCore, worker: VirtualWorker, now_s: float = 0.0, worker_id: str = "w0"):
    """One lock-step round: plan, apply on the virtual worker, report back. Returns (plan, events)."""
    plan = core.schedule(worker_id, now_s)
    refused = worker.apply(plan.commands)
    report = worker.step(plan.step_id) if plan.run_step else None
    if report is None:
        from alise.core.commands import StepReport

        report = StepReport(step_id=plan.step_id, num_free_device_blocks=worker.allocator.num_free)
    report.refused = refused
    events = core.apply_report(worker_id, report, now_s)
    return plan, events
