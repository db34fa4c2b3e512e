"""A worker's hello is checked against the model the scheduler serves."""

from __future__ import annotations

import asyncio
import shutil

from cluster_fixtures import cluster

from alise.worker.config import WorkerConfig
from alise.worker.service import Worker


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


async def refused_hello(scheduler_model: str, worker_model: str, caplog, **worker_overrides) -> list[str]:
    """Starts a scheduler with one worker of ``scheduler_model``, then a worker of
    ``worker_model``; returns the refusals that worker logged (empty: it joined)."""
    async with cluster(scheduler_model) as c:
        worker = Worker(WorkerConfig(scheduler_address=c.worker_address, model=worker_model, health_address="",
                                     worker_id="other", reconnect_delay_s=0.1, **worker_overrides))
        await worker.load()
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(worker.connected.wait(), 1.5)
        except TimeoutError:
            pass
        joined = "other" in c.scheduler.engine.links
        await worker.stop()
        await asyncio.wait_for(task, 10)
        worker.close()
    refusals = [r.getMessage() for r in caplog.records if "FAILED_PRECONDITION" in r.getMessage()]
    assert joined == (not refusals)
    return refusals


async def test_a_worker_with_other_weights_of_the_same_architecture_is_refused(tiny_llama_dir, tmp_path, caplog):
    from alise.modelinfo.identity import weights_fingerprint
    from tinymodels import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "reseeded", "llama", seed=1)
    mine, theirs = weights_fingerprint(tiny_llama_dir), weights_fingerprint(other)
    assert mine != theirs
    [refusal] = set(await refused_hello(str(tiny_llama_dir), str(other), caplog))
    assert mine in refusal and theirs in refusal and "other weights" in refusal
    caplog.clear()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)  # the same files elsewhere join
    assert await refused_hello(str(tiny_llama_dir), str(copy), caplog) == []


async def test_preset_workers_are_held_to_the_first_ones_seed(caplog):
    assert await refused_hello("tiny-llama", "tiny-llama", caplog) == []
    [refusal] = set(await refused_hello("tiny-llama", "tiny-llama", caplog, seed=1))
    assert "worker 'w0', the first to join" in refusal
