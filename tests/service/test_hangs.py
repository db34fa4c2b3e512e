"""Frozen processes (SIGSTOP) are noticed by keepalive pings, not by timeouts of minutes: a
frozen worker is dropped and its jobs go on elsewhere, and when it thaws its kept jobs are
aborted, not adopted; a frozen scheduler fails new SDK calls with UNAVAILABLE while it is
frozen (those sent with wait_for_ready wait for it), and a broken stream resumes once it
thaws; a long step is not a hang."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from cluster_fixtures import cluster
from faultkit import cluster_process, freeze, thaw, worker_process

from alise.client import Unavailable


async def until(condition, what: str, timeout_s: float) -> float:
    """Waits for ``condition``; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def collect(client, prompt: str, max_tokens: int, into: list[int]) -> None:
    async for chunk in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True):
        assert chunk.index == len(into), "a token repeated or missing"
        into += chunk.token_ids


async def test_a_frozen_worker_is_dropped_its_jobs_move_and_it_comes_back_clean(tiny_llama_dir, caplog):
    caplog.set_level(logging.INFO, logger="alise.scheduler.engine")
    async with cluster(str(tiny_llama_dir), num_workers=0) as c, c.client() as client, \
            worker_process(c.worker_address, str(tiny_llama_dir), "frozen") as proc:
        engine = c.scheduler.engine
        await until(lambda: "frozen" in engine.links, "the worker process attached", 120)
        got: list[list[int]] = [[], [], []]
        streams = [asyncio.ensure_future(collect(client, f"frozen {i}", 200, got[i])) for i in range(3)]
        await until(lambda: all(len(g) >= 3 for g in got), "tokens from the worker process", 60)
        freeze(proc)
        # Tokens the worker sent before it froze may still be on their way through the
        # scheduler's streams: the count settles well before the ~2 s the drop takes.
        await asyncio.sleep(0.5)
        progress = [len(g) for g in got]
        await until(lambda: "frozen" not in engine.links, "the frozen worker dropped while frozen", 8)
        assert [len(g) for g in got] == progress
        await c.add_worker(str(tiny_llama_dir))  # w0
        await until(lambda: all(len(g) > n for g, n in zip(got, progress, strict=True)), "the jobs go on on w0", 10)
        thaw(proc)
        await until(lambda: "frozen" in engine.links, "the thawed worker back", 30)
        await asyncio.gather(*streams)
        await asyncio.sleep(1.5)  # a census of the thawed worker
        status = {w["worker_id"]: w for w in (await client.status()).workers}
    assert [len(g) for g in got] == [200, 200, 200]
    assert not c.scheduler.streams.orphans
    kept = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    assert kept and "kept 3 jobs under this scheduler" in kept[0] and "0 adopted" in kept[0], kept
    assert status["frozen"]["num_censuses"] > 0 and status["frozen"]["num_ghost_jobs"] == 0


async def test_a_long_step_is_not_taken_for_a_hang(tiny_llama_dir, caplog):
    """One step busy for 4 s, holding the GIL in Python: the worker's pings are answered by
    gRPC core meanwhile, so it stays attached (a frozen one is dropped within 3 s)."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        engine = c.scheduler.engine
        link = engine.links["w0"]
        executor = c.workers[0][0].engine.executor
        execute, launch, slow = executor.execute, executor.launch, {"left": 1}

        def busy_once(run, *args):
            if slow["left"]:
                slow["left"] = 0
                end = time.monotonic() + 4.0
                while time.monotonic() < end:
                    pass
            return run(*args)
        # Steps one after another call ``execute``; overlapped steps ``launch``.
        executor.execute = lambda feeds: busy_once(execute, feeds)
        executor.launch = lambda feeds, previous: busy_once(launch, feeds, previous)
        result = await client.complete("a slow step", max_tokens=5, ignore_eos=True)
        assert engine.links["w0"] is link
        assert not [r for r in caplog.records if "left" in r.getMessage()]
    assert len(result.token_ids) == 5 and not slow["left"]


async def test_a_frozen_scheduler_fails_new_calls_fast_and_streams_resume_after(tiny_llama_dir):
    async with cluster_process(str(tiny_llama_dir)) as (proc, address):
        from alise.client import AsyncClient

        async with AsyncClient(address) as client:
            await client.complete("warm up", max_tokens=2)
            got: list[int] = []
            stream = asyncio.ensure_future(collect(client, "through a freeze", 220, got))
            await until(lambda: len(got) >= 3, "first tokens", 30)
            freeze(proc)
            started = time.monotonic()
            waiting = asyncio.ensure_future(client.complete("waits for the thaw", max_tokens=5, ignore_eos=True,
                                                            wait_for_ready=True, timeout_s=60))
            with pytest.raises(Unavailable):  # (gRPC's defaults: it waits for the whole freeze)
                await asyncio.wait_for(client.complete("sent while frozen", max_tokens=2), 5.0)
            failed_s = time.monotonic() - started
            await asyncio.sleep(max(5.0 - failed_s, 0.0))
            frozen_for_s = time.monotonic() - started
            assert not waiting.done()
            thaw(proc)
            await asyncio.wait_for(stream, 60)
            waited = await asyncio.wait_for(waiting, 60)
    assert failed_s < frozen_for_s  # it failed while frozen, not once thawed
    assert len(got) == 220 and len(waited.token_ids) == 5
