"""A real cluster in this process (scheduler + workers on loopback, port 0) for benchmarks.

The scheduler and the workers are the real services (gRPC, engine loop, model runner); only
the predictor is replaced by a table of precomputed, cross-fitted estimates keyed by prompt
text, so an ``alise`` run sees the predictions a deployment would, without a predictor
process competing for the CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from alise.core.job import LengthEstimate
from alise.tools.bench.openloop import RequestResult, run_bench
from alise.tools.trace import TraceRequest


def table_predictor(by_prompt: Mapping[str, LengthEstimate]):
    async def predict(prompts: list[str], prompt_tokens: list[int], timeout_s: float, contexts=None):
        missing = LengthEstimate(128.0, 128.0, 512.0, "prior")
        return [by_prompt.get(p, missing) for p in prompts]

    return predict


async def run_on_cluster(requests: Sequence[TraceRequest], *, policy: str, model: str,
                         estimates_by_prompt: Mapping[str, LengthEstimate] | None = None,
                         num_workers: int = 1, worker_overrides: dict | None = None,
                         latency_profile: str | None = None,
                         timeout_s: float = 900.0, stats: dict | None = None
                         ) -> list[RequestResult]:
    """Replays ``requests``; fills ``stats`` (if given) with the core's preemption counts."""
    from alise.core.config import SchedulingConfig
    from alise.scheduler.config import SchedulerConfig
    from alise.scheduler.service import start_scheduler
    from alise.worker.config import WorkerConfig
    from alise.worker.service import Worker

    config = SchedulerConfig(address="127.0.0.1:0", model=model, scheduling=SchedulingConfig(policy=policy),
                             latency_profile=latency_profile)
    predict = table_predictor(estimates_by_prompt) if estimates_by_prompt else None
    scheduler = await start_scheduler(config, predict=predict)
    address = f"127.0.0.1:{scheduler.port}"
    workers = []
    try:
        for i in range(num_workers):
            cfg = WorkerConfig(scheduler_address=f"127.0.0.1:{scheduler.worker_port}", model=model, health_address="",
                               worker_id=f"w{i}", reconnect_delay_s=0.1,
                               **(worker_overrides or {}))
            worker = Worker(cfg)
            await worker.load()
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(worker.connected.wait(), 60)
            workers.append((worker, task))
        results = await run_bench(requests, address, timeout_s=timeout_s,
                                  request_prefix=f"{policy}-")
        if stats is not None:
            core = scheduler.engine.core
            stats.update(preemptions=dict(core.preemptions),
                         kv_moves=dict(getattr(core, "kv_moves", {})),
                         latency_correction=scheduler.engine.latency.correction)
        return results
    finally:
        for worker, task in workers:
            await worker.stop()
            await asyncio.wait_for(task, 30)
            worker.close()
        await scheduler.stop(grace_s=0.1)
