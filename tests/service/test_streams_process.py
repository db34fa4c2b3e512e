"""The scheduler with its client front in a process of its own (``streams_process``): clients
get the same streams, refusals and cancels as from the scheduler's own listener, and either
process going ends the other's part cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from cluster_fixtures import cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.client import InvalidRequest
from alise.scheduler.front_wire import STALL_AFTER_S, Reply
from alise.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def greedy_chunks(c, prompt: str, n: int) -> list:
    async with c.client() as client:
        return [ch async for ch in client.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)]


async def test_front_streams_what_the_scheduler_streams(tiny_llama_dir):
    """Tokens, indices, text and usage as from the scheduler's own listener; status, metrics
    and health answered through the front."""
    async with cluster(str(tiny_llama_dir)) as c:
        inline = await greedy_chunks(c, "the cat sat on the", 12)
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        assert c.scheduler.server.port == c.scheduler.port != 0
        front = await greedy_chunks(c, "the cat sat on the", 12)
        async with c.client() as client:
            status = await client.status()
            metrics, _ = await client.metrics()
        async with grpc.aio.insecure_channel(c.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert [(ch.index, ch.token_ids, ch.text) for ch in front] == [(ch.index, ch.token_ids, ch.text) for ch in inline]
    assert "".join(ch.text for ch in front)
    assert front[-1].finish_reason == "length" and front[-1].usage.completion_tokens == 12
    assert len(status.workers) == 1
    assert "alise_requests" in metrics
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_front_relays_refusals_and_client_cancels(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), streams_process=True) as c, c.client() as client:
        with pytest.raises(InvalidRequest, match="max_tokens"):
            await client.complete("hi", max_tokens=0)
        seen = 0
        async for chunk in client.generate("a long story " * 5, max_tokens=500, ignore_eos=True):
            seen += len(chunk.token_ids)
            if seen >= 5:
                assert c.scheduler.streams.num_live() == 1
                break
        # The client went: the front tells the planning process, which cancels the job.
        core = c.scheduler.engine.core
        await wait_for(lambda: not c.scheduler.streams.num_live() and not core.jobs)
        out = await client.complete("still serving", max_tokens=3, ignore_eos=True)
    assert len(out.token_ids) == 3


async def test_planning_process_gone_ends_streams_resumable(tiny_llama_dir):
    """The front's socket to the planning process closes mid-stream (as when that process is
    killed): the client's stream ends UNAVAILABLE with alise-resumable 1, so the SDK resumes it
    on the scheduler that comes back."""
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        front = c.scheduler.server
        async with grpc.aio.insecure_channel(c.address) as channel:
            call = long_generation(channel)
            async for _ in call:
                front._stopping = True  # what follows is this test's doing, not a failure
                front._writer.writer.transport.abort()
                break
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
            trailing = dict(await call.trailing_metadata() or ())
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert trailing.get("alise-resumable") == "1"
        await asyncio.wait_for(front._proc.wait(), 10)


async def test_front_gone_fails_the_scheduler(tiny_llama_dir):
    """A front that exits leaves the scheduler with no clients: it fails (exits non-zero, and
    is restarted), never serves on without a listener."""
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        os.kill(c.scheduler.server._proc.pid, signal.SIGKILL)
        await asyncio.wait_for(c.scheduler.failed.wait(), 10)


async def test_frozen_planning_process_fails_streams_fast_then_serves(tiny_llama_dir):
    """The planning process stops turning (here: this test's loop, which is that process's,
    blocked past STALL_AFTER_S): the front fails the stream in flight UNAVAILABLE, resumable,
    as a client's keepalive fails a frozen scheduler's, and serves again once it turns."""
    async with cluster(str(tiny_llama_dir), streams_process=True) as c, c.client() as client:
        async with grpc.aio.insecure_channel(c.address) as channel:
            call = long_generation(channel)
            async for _ in call:
                time.sleep(STALL_AFTER_S + 1.0)  # noqa: ASYNC251 - the freeze under test
                break
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
            trailing = dict(await call.trailing_metadata() or ())
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "not answering" in exc.value.details()
        assert trailing.get("alise-resumable") == "1"
        # A call that reaches the front before the planning process's first frame since the
        # thaw is still refused (resumable): wait_for_ready sends it again.
        out = await client.complete("after the thaw", max_tokens=3, ignore_eos=True, wait_for_ready=True,
                                    timeout_s=30)
        assert len(out.token_ids) == 3
        await wait_for(lambda: not c.scheduler.engine.core.jobs)  # the failed stream's job is cancelled


async def test_planning_process_gone_while_draining_ends_streams_resumable(tiny_llama_dir):
    """The planning process dies while the front drains its calls (told to stop listening
    with a long grace, then killed): the streams end at once as failed by a scheduler that
    restarts, UNAVAILABLE and resumable (they waited for the stall watch, 2.5 s, and were
    told the scheduler was not answering), and the front exits as for a failure."""
    from alise.scheduler.front_wire import StopListening

    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        front = c.scheduler.server
        async with grpc.aio.insecure_channel(c.address) as channel:
            call = long_generation(channel)
            async for _ in call:
                front._stopping = True  # what follows is this test's doing, not a failure
                front._writer.send(StopListening(60.0))
                await front._writer.drain()
                await asyncio.sleep(0.5)  # the front is draining
                front._writer.writer.transport.abort()
                break

            async def rest():
                async for _ in call:
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await asyncio.wait_for(rest(), 10)
            trailing = dict(await call.trailing_metadata() or ())
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in exc.value.details()
        assert trailing.get("alise-resumable") == "1"
        assert await asyncio.wait_for(front._proc.wait(), 10) == 1


def long_generation(channel, max_tokens: int = 1000):
    return scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(scheduler_pb2.GenerateRequest(
        text="a long story", sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def resume(pid: int) -> None:
    """Lets a front this test stopped run again (it may be dead already)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


async def test_frozen_front_is_killed_and_fails_the_scheduler(tiny_llama_dir):
    """The front stops turning (SIGSTOP) while it streams a long generation: the planning
    process notices within STALL_AFTER_S and a tick, kills the front (its clients' connections
    break, which the SDK resumes, and its port is free for the restart) and fails, to be
    restarted; what it buffered for the front meanwhile is dropped, never past the bound."""
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        front = c.scheduler.server
        transport = front._writer.writer.transport
        pid = front._proc.pid
        async with grpc.aio.insecure_channel(c.address) as channel:
            call = long_generation(channel)
            try:
                async for _ in call:
                    os.kill(pid, signal.SIGSTOP)
                    break
                stopped_s = time.monotonic()
                num_unread: list[int] = []
                while not c.scheduler.failed.is_set() and time.monotonic() - stopped_s < STALL_AFTER_S + 2.0:
                    num_unread.append(transport.get_write_buffer_size())
                    await asyncio.sleep(0.05)
                noticed_s = time.monotonic() - stopped_s
            finally:
                resume(pid)
            assert c.scheduler.failed.is_set(), "a frozen front went unnoticed"
            assert STALL_AFTER_S - 1.0 < noticed_s < STALL_AFTER_S + 1.0
            assert await asyncio.wait_for(front._proc.wait(), 5) == -signal.SIGKILL
            assert transport.is_closing() and transport.get_write_buffer_size() == 0
            assert max(num_unread) <= front._writer.max_unread_bytes
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_front_that_leaves_too_much_unread_is_killed(tiny_llama_dir, caplog):
    """Output for a stopped front beyond the bound (here lowered to 1 MiB, and a burst of
    256 KiB frames where many streams' replies would be): the planning process stops at the
    frame that passes it, long before the front counts as silent, kills the front and fails;
    what it holds for the front never passes the bound by more than that one frame."""
    frame_bytes = 256 << 10
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        front = c.scheduler.server
        front._writer.max_unread_bytes = 1 << 20
        transport = front._writer.writer.transport
        pid = front._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            num_unread = []
            for _ in range(32):  # 8 MiB at most
                front._writer.send(Reply(0, bytes(frame_bytes)))  # call 0 is no call: the front drops it
                await asyncio.sleep(0)  # one frame a turn
                num_unread.append(transport.get_write_buffer_size())
                if c.scheduler.failed.is_set():
                    break
        finally:
            resume(pid)
        assert c.scheduler.failed.is_set(), "the output for a stopped front grew past the bound"
        assert max(num_unread) <= (1 << 20) + frame_bytes + 64
        assert "MiB unread" in caplog.text
        assert await asyncio.wait_for(front._proc.wait(), 5) == -signal.SIGKILL


async def test_front_slow_for_a_second_is_not_failed(tiny_llama_dir):
    """A front that stops for 1 s (under STALL_AFTER_S) mid-stream is only late: the stream
    ends complete and nothing fails; nor does a front idle past STALL_AFTER_S (its heartbeat)."""
    async with cluster(str(tiny_llama_dir), streams_process=True) as c:
        front = c.scheduler.server
        pid = front._proc.pid
        num_tokens = 0
        async with grpc.aio.insecure_channel(c.address) as channel:
            call = long_generation(channel, max_tokens=200)
            try:
                async for response in call:
                    if not num_tokens:
                        os.kill(pid, signal.SIGSTOP)
                        await asyncio.sleep(1.0)
                        os.kill(pid, signal.SIGCONT)
                    num_tokens += len(response.token_ids)
            finally:
                resume(pid)
        assert num_tokens == 200
        await asyncio.sleep(STALL_AFTER_S + 0.5)
        assert not c.scheduler.failed.is_set() and front._proc.returncode is None
