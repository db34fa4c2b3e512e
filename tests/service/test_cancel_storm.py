"""Requests cancelled at random moments against plans in flight, through the real SDK, over
in-process gRPC to a real worker: the worker and the scheduler agree on the worker's jobs
after every step (a census every plan), and nothing is left behind."""

from __future__ import annotations

import asyncio
import random

from cluster_fixtures import cluster


async def until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.05)


async def test_cancels_at_random_moments_leave_no_ghost(tiny_llama_dir):
    rng = random.Random(7)
    async with cluster(str(tiny_llama_dir), worker_overrides=dict(max_num_seqs=16)) as c, \
            c.client() as client:
        engine = c.scheduler.engine
        engine.census_interval_s = 0.0  # every plan asks the worker for its jobs
        worker = c.workers[0][0]

        async def stream(i: int, max_tokens: int) -> int:
            n = 0
            async for chunk in client.generate(f"request {i} " * rng.randint(1, 30), max_tokens=max_tokens,
                                               ignore_eos=True):
                assert chunk.index == n
                n += len(chunk.token_ids)
            return n

        async def cancelled(i: int) -> None:
            task = asyncio.ensure_future(stream(i, 200))
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        load = [asyncio.ensure_future(stream(-k, 60)) for k in range(4)]  # keeps plans flowing
        for wave in range(8):
            await asyncio.gather(*(cancelled(16 * wave + i) for i in range(16)))
        assert await asyncio.gather(*load) == [60] * 4
        await until(lambda: not engine.core.jobs, "every job gone from the scheduler")
        await asyncio.sleep(1.0)  # a census of the idle worker, which has nothing to run
        view = engine.core.workers["w0"]
        assert view.disagreements.num_censuses > 50
        assert (view.disagreements.num_ghosts, view.disagreements.num_missing,
                view.disagreements.num_block_deficits) == (0, 0, 0)
        # Those cancelled before the engine took them never reached the core.
        assert engine.core.num_cancelled > 20
        await until(lambda: not worker.engine.seqs, "no job left on the worker")
        total = view.capacity.num_device_blocks
        assert worker.engine.kv.num_free_device == view.num_free_device_blocks == total
        [status] = (await client.status()).workers
        assert (status["num_ghost_jobs"], status["num_free_device_blocks"]) == (0, total)
