"""Scheduler + worker in-process, driven through the real SDK over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cluster_fixtures import cluster

from alise.client import InvalidRequest, Unavailable


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_stream_tokens_indices_and_usage(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        chunks = [ch async for ch in client.generate("hello world", max_tokens=12, ignore_eos=True)]
    tokens = [t for ch in chunks for t in ch.token_ids]
    assert len(tokens) == 12
    assert [ch.index for ch in chunks] == [sum(len(x.token_ids) for x in chunks[:i]) for i in range(len(chunks))]
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens >= 3
    assert all(ch.finish_reason is None for ch in chunks[:-1])


async def test_greedy_is_deterministic_and_matches_token_prompt(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        a = await client.complete("the cat sat", max_tokens=8, temperature=0, ignore_eos=True)
        b = await client.complete("the cat sat", max_tokens=8, temperature=0, ignore_eos=True)
        prompt_ids = c.scheduler.servicer.info.tokenizer.encode("the cat sat")
        d = await client.complete(prompt_ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert a.token_ids == b.token_ids == d.token_ids
    assert len(a.token_ids) == 8


async def test_seeded_sampling_reproducible(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        runs = [await client.complete("seeded", max_tokens=10, temperature=1.0, seed=7,
                                      ignore_eos=True) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids


@pytest.mark.parametrize("kwargs, prompt, fragment", [
    ({}, "", "prompt is empty"),
    ({}, "   ", "prompt is empty"),
    ({}, [], "prompt is empty"),
    ({"max_tokens": 0}, "hi", "max_tokens"),
    ({"max_tokens": -3}, "hi", "max_tokens"),
    ({"max_tokens": 2_000_000_000}, "hi", "max_tokens"),
    ({"temperature": -0.5}, "hi", "temperature"),
    ({"temperature": float("nan")}, "hi", "temperature"),
    ({"top_p": 1.5}, "hi", "top_p"),
    ({}, [5, 10, 999_999], "outside the vocabulary"),
    ({}, [-1, 5], "outside the vocabulary"),
    ({"stop_token_ids": [10**8]}, "hi", "stop_token_ids"),
])
async def test_bad_input_is_invalid_argument_and_harmless(tiny_llama_dir, kwargs, prompt, fragment):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        with pytest.raises(InvalidRequest) as info:
            await client.complete(prompt, **kwargs)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details
        ok = await client.complete("still serving", max_tokens=3, ignore_eos=True)
        assert len(ok.token_ids) == 3


async def test_prompt_longer_than_context(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), max_model_len=64) as c, c.client() as client:
        with pytest.raises(InvalidRequest, match="context is 64 tokens"):
            await client.complete("word " * 200, max_tokens=4)
        ok = await client.complete("short", max_tokens=2, ignore_eos=True)
        assert len(ok.token_ids) == 2


async def test_generation_stops_at_context_limit(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), max_model_len=32,
                       worker_overrides={"max_model_len": 32}) as c, c.client() as client:
        out = await client.complete("a b c d", max_tokens=1000, ignore_eos=True)
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 32


async def test_cancel_mid_stream_frees_blocks(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), worker_overrides={"block_size": 4}) as c, c.client() as client:
        worker = c.workers[0][0]
        total = worker.engine.allocator.num_blocks
        seen = 0
        async for chunk in client.generate("a long story " * 5, max_tokens=500, ignore_eos=True):
            seen += len(chunk.token_ids)
            if seen >= 5:
                assert worker.engine.allocator.num_free < total  # it really held blocks
                break

        async def freed():
            return worker.engine.allocator.num_free == total and not worker.engine.seqs
        await wait_for(freed)
        status = await client.status()
        assert status.num_running == 0 and status.num_waiting == 0


async def test_concurrent_streams_interleave(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        async def run(prompt, n):
            return await client.complete(prompt, max_tokens=n, ignore_eos=True)
        results = await asyncio.gather(*(run(f"prompt number {i}", 6 + i) for i in range(6)))
    assert [len(r.token_ids) for r in results] == [6 + i for i in range(6)]
    assert len({r.request_id for r in results}) == 6


async def test_waits_for_a_worker_then_serves(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), num_workers=0) as c, c.client() as client:
        task = asyncio.create_task(client.complete("late worker", max_tokens=4, ignore_eos=True))
        await asyncio.sleep(0.3)
        assert not task.done()
        await c.add_worker(str(tiny_llama_dir))
        out = await asyncio.wait_for(task, 20)
    assert len(out.token_ids) == 4


async def test_no_worker_is_unavailable_after_bound(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), num_workers=0, max_wait_no_worker_s=0.3) as c, \
            c.client() as client:
        with pytest.raises(Unavailable, match="no worker"):
            await client.complete("nobody home", max_tokens=4)


async def test_memory_pressure_preempts_and_everyone_finishes(tiny_llama_dir):
    # 12 blocks of 4 tokens = 48 token slots; four jobs of ~6 + 20 tokens need 4 * 7 blocks.
    overrides = {"block_size": 4, "num_device_blocks": 12}
    async with cluster(str(tiny_llama_dir), worker_overrides=overrides) as c, c.client() as client:
        results = await asyncio.gather(*(
            client.complete(f"job {i} here", max_tokens=20, ignore_eos=True, temperature=0)
            for i in range(4)))
        status = await client.status()
    assert all(len(r.token_ids) == 20 for r in results)
    assert status.num_preemptions > 0
    assert status.preemptions_by_action.get("drop", 0) > 0


async def test_status_reports_worker(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        status = await client.status()
    assert status.policy == "alise"  # SchedulerConfig's default
    [w] = status.workers
    assert w["worker_id"] == "w0"
    assert int(w["num_device_blocks"]) > 0


async def test_cycle_times_account_for_every_step(tiny_llama_dir, caplog):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        engine = c.scheduler.engine
        engine.census_interval_s = float("inf")  # a census of an idle worker is a plan of its own
        link = next(iter(engine.links.values()))
        await client.complete("time the cycles", max_tokens=12, ignore_eos=True)
        times = link.times
        # 12 tokens take 12 steps, each planned and reported (the welcome's report apart).
        assert times.reports == times.plans == 12
        assert times.device_s > 0 and times.schedule_s > 0 and times.apply_s > 0
        c.scheduler.status.log_cycle_times_s = 0.0  # looked at every second
        c.workers[0][0].log_cycle_times_s = 0.0
        with caplog.at_level("INFO"):
            await client.complete("and log them", max_tokens=3, ignore_eos=True)
            for _ in range(30):
                await asyncio.sleep(0.1)
                messages = [r.getMessage() for r in caplog.records]
                if any("reports" in m and "planning" in m and "device" in m for m in messages):  # scheduler
                    break
            else:
                raise AssertionError("the scheduler logged no cycle times")
        assert any("waiting for the plan" in m and "executing" in m for m in messages)  # worker


async def test_failed_step_hands_jobs_back_and_worker_carries_on(tiny_llama_dir, caplog):
    """A step that raises (as a CUDA out-of-memory would) does not kill the worker: its jobs go
    back to the scheduler, it reconnects with the same loaded model, the streams finish."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        worker = c.workers[0][0]
        engine = worker.engine
        real_step, real_launch = engine.step, engine.launch
        calls = {"n": 0}

        def flaky(run, *args):
            calls["n"] += 1
            if calls["n"] == 6:
                raise RuntimeError("CUDA out of memory (injected)")
            return run(*args)

        # Steps one after another run ``step``; overlapped steps ``launch``.
        engine.step = lambda plan: flaky(real_step, plan)
        engine.launch = lambda plan, previous=None: flaky(real_launch, plan, previous)
        results = await asyncio.gather(*(client.complete(f"survive {i}", max_tokens=12, ignore_eos=True)
                                         for i in range(3)))
        assert [len(r.token_ids) for r in results] == [12, 12, 12]
        assert calls["n"] > 6                      # it kept stepping after the failure
        assert worker.engine is engine            # same engine, no reload
        assert worker.metrics.step_failures._value.get() == 1
        assert any("step" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)

        async def freed():
            return engine.allocator.num_free == engine.allocator.num_blocks and not engine.seqs
        await wait_for(freed)
