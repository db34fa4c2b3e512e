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

        async def stream(i: int, max_tokens: int, first_token: asyncio.Event | None = None) -> int:
            n = 0
            async for chunk in client.generate(f"request {i} " * rng.randint(1, 30), max_tokens=max_tokens,
                                               ignore_eos=True):
                assert chunk.index == n
                n += len(chunk.token_ids)
                if first_token is not None:
                    first_token.set()
            return n

        async def cancelled(i: int) -> None:
            """Cancelled 0 to 50 ms after it is sent, or (every other one) after its first token:
            on a busy machine the first may never reach the core, the second always has."""
            first_token = asyncio.Event()
            task = asyncio.ensure_future(stream(i, 200, first_token))
            if i % 2:
                await asyncio.wait_for(first_token.wait(), 30)
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
        # Those cancelled before the engine took them never reached the core; those cancelled
        # after their first token did (64 of them, each with tokens left).
        assert engine.core.num_cancelled >= 64
        await until(lambda: not worker.engine.seqs, "no job left on the worker")
        total = view.capacity.num_device_blocks
        assert worker.engine.kv.num_free_device == view.num_free_device_blocks == total
        [status] = (await client.status()).workers
        assert (status["num_ghost_jobs"], status["num_free_device_blocks"]) == (0, total)


async def test_a_ghost_is_aborted_on_sight_and_alise_status_says_so(tiny_llama_dir):
    """A job appears on the worker behind the scheduler's back (as the ghosts of a lost abort
    did): the next census aborts it there, and `alise status` shows the disagreement."""
    import subprocess
    import sys

    from alise.core.commands import Admit
    from alise.core.sampling import SamplingParams

    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        worker = c.workers[0][0]
        apply, planted = worker.engine.apply, []

        def plant_once(commands):  # in the step thread, before a plan's commands, as a lost abort's admit ran
            if not planted:
                planted.append(apply([Admit("ghost", [5, 6, 7], SamplingParams(max_tokens=500))]))
            return apply(commands)
        worker.engine.apply = plant_once  # both step paths (run; launch and finish) apply a plan here
        await client.complete("anything", max_tokens=3)
        await until(lambda: "ghost" not in worker.engine.seqs, "the ghost aborted", 10)
        view = c.scheduler.engine.core.workers["w0"]
        assert view.disagreements.num_ghosts == 1
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "alise.cli.main", "status",
                                                        "--address", c.address], capture_output=True, text=True)
    assert "its censuses disagreed: 1 jobs it held unknown to the scheduler (aborted)" in out.stdout, out
