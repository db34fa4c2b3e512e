"""Replacing the latency model's coefficients (a worker brought its profile) refreshes every
cached remaining time in the core's job table."""

from __future__ import annotations

import pytest

from alise.core.blocks import WorkerCapacity
from alise.core.config import SchedulingConfig
from alise.core.latency_model import LatencyModel
from alise.core.policy import make_policy
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import virtual_worker
from corekit import make_job, step


def _core(latency: LatencyModel):
    core = SchedulerCore(make_policy(SchedulingConfig(policy="alise"), latency))
    core.add_worker(WorkerCapacity("w0", 16, 64, 0, 2048, 1, 4096))
    worker = virtual_worker(num_device_blocks=64, block_size=16, max_model_len=2048, latency=latency)
    return core, worker


def _idle_remaining(core: SchedulerCore) -> dict[str, tuple[float, float]]:
    """job id -> (cached remaining time, remaining time recomputed now) of idle jobs."""
    table, est = core.table, core.estimator
    return {job.job_id: (float(table.remaining_base_s[table.slot_of[job.job_id]]),
                         est.remaining_base_s(job, core.policy.estimate_of(job)))
            for job in core.waiting.values()}


@pytest.mark.parametrize("notify", [True, False])
def test_cached_remaining_times_follow_new_coefficients(notify):
    latency = LatencyModel(c0_s=1e-3, c_seq_s=1e-5, c_ctx_s=1e-8, c_pre_s=1e-5)
    core, worker = _core(latency)
    for i, (prompt, predicted) in enumerate([(10, 40), (300, 20), (50, 80), (600, 10)]):
        core.submit(make_job(f"j{i}", prompt, max_tokens=200, arrival_s=0.0, predicted=predicted))
    step(core, worker, 0.0)
    step(core, worker, 0.01)
    before = _idle_remaining(core)
    assert before and all(cached == fresh for cached, fresh in before.values())
    latency.c0_s, latency.c_pre_s = 0.011, 3e-3      # the worker's measured profile
    if notify:
        core.latency_changed()
    step(core, worker, 0.02)
    after = _idle_remaining(core)
    stale = {job_id for job_id, (cached, fresh) in after.items() if cached != fresh}
    if notify:
        assert not stale
    else:  # the control: without the notice the cache keeps the old prices
        assert stale
