"""A worker's hello is checked against the model the scheduler serves."""

from __future__ import annotations

import asyncio

from alise.worker.config import WorkerConfig
from alise.worker.service import Worker
from cluster_fixtures import cluster


async def test_a_worker_serving_another_model_is_refused(tiny_llama_dir, tiny_opt_dir, caplog):
    # Same vocabulary (both use the MiniLM tokenizer), different architecture.
    async with cluster(str(tiny_llama_dir), num_workers=0) as c:
        worker = Worker(WorkerConfig(scheduler_address=c.worker_address, model=str(tiny_opt_dir), health_address="",
                                     reconnect_delay_s=0.1))
        await worker.load()
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(1.0)
        assert not worker.connected.is_set() and not c.scheduler.engine.links
        await worker.stop()
        await asyncio.wait_for(task, 10)
        worker.close()
    refusals = [r.getMessage() for r in caplog.records if "FAILED_PRECONDITION" in r.getMessage()]
    assert refusals and "opt:" in refusals[0] and "llama:" in refusals[0]
    # The same model joins.
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        assert len((await client.complete("same model", max_tokens=2)).token_ids) == 2
