"""The serving loop on a real (tiny) model over in-process gRPC: plans in flight ahead of the
worker, chunked prefill, aborts ahead of plans, reports checked whole, a supervised loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import grpc
import pytest
from cluster_fixtures import cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_relay import TcpRelay

from alise.client import AliseError
from alise.core.commands import JobOutput

PROMPT = " ".join(f"word{i}" for i in range(40))


async def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(tiny_llama_dir):
    """A prompt fed in chunks of at most 16 tokens (and at most 12 beside two decodes) yields
    the greedy tokens of the same prompt fed whole: the chunks' K/V are the prompt's."""
    outputs = {}
    for budget in (16, 0):
        async with cluster(str(tiny_llama_dir), worker_overrides=dict(
                max_num_seqs=4, max_num_batched_tokens=budget)) as c, c.client() as client:
            engine = c.workers[0][0].engine
            shapes = []
            step, finish = engine.step, engine.finish

            def spy(report, shapes=shapes):
                if report.chunks or report.num_decode_tokens:
                    shapes.append(sum(n for _, n in report.chunks) + report.num_decode_tokens)
                return report
            # A step's report: from step (steps one after another) or finish (overlapped).
            engine.step = lambda plan, step=step: spy(step(plan))
            engine.finish = lambda launched, finish=finish: spy(finish(launched))
            results = await asyncio.gather(
                client.complete(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True),
                client.complete("a short one", max_tokens=12, temperature=0.0, ignore_eos=True))
            outputs[budget] = [r.token_ids for r in results]
            if budget:
                assert max(shapes) <= budget and len(shapes) > 12  # the prompt took several steps
    assert outputs[16] == outputs[0] and all(len(t) == 12 for t in outputs[0])


async def test_the_next_plan_is_in_flight_before_a_report_comes_back(tiny_llama_dir):
    """With its depth of plans in flight (two or more: ``min_plans_ahead`` by default, up to
    ``plans_ahead`` on a worker found waiting) the worker runs step k while step k + 1 is
    already sent: after every batch of events the loop leaves that many plans in flight while
    the job has tokens left to plan (the protocol's count, not a timing: on a slow machine
    several reports may land in one batch, and the top-up after it still restores them)."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        engine = c.scheduler.engine
        core = engine.core
        assert 2 <= engine.min_plans_ahead <= engine.plans_ahead
        seen = []
        dispatch = engine._dispatch

        def spy(now_s):
            dispatch(now_s)
            for link in engine.links.values():
                left = [job.sampling.max_tokens - job.num_generated for job in core.jobs.values()]
                if left and link.num_steps:
                    depth = engine.depths[link.worker_id].depth
                    assert engine.min_plans_ahead <= depth <= engine.plans_ahead
                    seen.append((core.num_in_flight(link.worker_id), depth, max(left)))
        engine._dispatch = spy
        result = await client.complete("keep the worker busy", max_tokens=30, ignore_eos=True)
    assert len(result.token_ids) == 30
    assert len(seen) >= 10, seen
    # Fewer in flight only once every token of the job is already planned.
    assert all(n == depth or left == 0 for n, depth, left in seen), seen
    assert sum(n == depth for n, depth, _ in seen) >= 10, seen


async def test_an_aborted_job_costs_no_step_after_the_abort_reaches_the_worker(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        worker = c.workers[0][0]
        engine = worker.engine
        steps: list[tuple[float, set[str]]] = []
        aborts: list[float] = []
        run, launch, abort = engine.run, engine.launch, engine.abort

        def spy_run(plan):
            steps.append((time.monotonic(), set(engine.seqs)))
            return run(plan)

        def spy_launch(plan, previous=None):  # the overlapped steps' start
            steps.append((time.monotonic(), set(engine.seqs)))
            return launch(plan, previous)

        def spy_abort(job_ids, through=-1):
            aborts.append(time.monotonic())
            return abort(job_ids, through)
        engine.run, engine.launch, engine.abort = spy_run, spy_launch, spy_abort
        seen = 0
        async for chunk in client.generate("cancel me soon", max_tokens=200, ignore_eos=True,
                                           request_id="victim"):
            seen += len(chunk.token_ids)
            if seen >= 5:
                break
        busy = asyncio.ensure_future(client.complete("another job", max_tokens=40, ignore_eos=True))
        await asyncio.sleep(0.3)
        await busy
    assert aborts, "the abort never reached the worker"
    assert not [t for t, jobs in steps if t > aborts[0] and "victim" in jobs]


async def test_a_bad_report_disconnects_the_worker_and_leaves_no_gap_or_repeat(tiny_llama_dir, caplog):
    """The 8th report claims a wrong token count for one job: the scheduler refuses the report
    whole (nothing of it streams), drops the worker, which reconnects; the jobs recompute and
    every stream ends with its exact tokens, indexes contiguous."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        engine = c.workers[0][0].engine
        run, finish, calls = engine.run, engine.finish, {"n": 0}

        def corrupted(report):
            calls["n"] += 1
            if calls["n"] == 8 and report.outputs:
                out = report.outputs[0]
                report.outputs[0] = JobOutput(out.job_id, out.token_ids, out.finish_reason, out.num_tokens + 1)
            return report
        # Reports come from run (steps one after another) or finish (overlapped steps).
        engine.run = lambda plan: corrupted(run(plan))
        engine.finish = lambda launched: corrupted(finish(launched))

        async def stream(i: int) -> list[int]:
            tokens = []
            async for chunk in client.generate(f"stream {i}", max_tokens=20, ignore_eos=True):
                assert chunk.index == len(tokens)
                tokens += chunk.token_ids
            return tokens
        results = await asyncio.gather(*(stream(i) for i in range(3)))
    assert [len(t) for t in results] == [20, 20, 20]
    assert any("disconnecting" in r.getMessage() and "holds" in r.getMessage() for r in caplog.records)


async def health_of(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


async def test_a_failure_in_scheduling_is_logged_and_turns_health_not_serving(tiny_llama_dir, caplog):
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        assert await health_of(c.address) == health_pb2.HealthCheckResponse.SERVING
        await client.complete("fine", max_tokens=2)
        core = c.scheduler.engine.core

        def broken(*args, **kwargs):
            raise RuntimeError("injected fault in schedule")
        core.schedule = broken
        with pytest.raises(AliseError) as err:  # resumable, but no scheduler comes back here
            await client.complete("this one hits the fault", max_tokens=4, resume_timeout_s=0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(c.scheduler.failed.wait(), 5)
        assert await health_of(c.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(AliseError) as err:  # refused at the door from now on, not stalled
            await client.complete("after the fault", max_tokens=4, resume_timeout_s=0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert any("scheduling loop failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_the_scheduler_process_exits_non_zero_when_its_loop_fails(tiny_llama_dir, monkeypatch):
    from alise.core.scheduler import SchedulerCore
    from alise.scheduler.config import SchedulerConfig
    from alise.scheduler.main import serve
    from alise.worker.config import WorkerConfig
    from alise.worker.service import Worker

    def broken(self, worker_id, now_s, **kwargs):
        raise RuntimeError("injected fault in schedule")
    monkeypatch.setattr(SchedulerCore, "schedule", broken)
    client_port, worker_port = free_ports(2)
    config = SchedulerConfig(address=f"127.0.0.1:{client_port}", worker_address=f"127.0.0.1:{worker_port}",
                             model=str(tiny_llama_dir))
    served = asyncio.ensure_future(serve(config))
    worker = Worker(WorkerConfig(scheduler_address=config.worker_listen_address, model=str(tiny_llama_dir),
                                 health_address="", reconnect_delay_s=0.1))
    task = None
    try:
        await worker.load()
        task = asyncio.ensure_future(worker.run())
        assert await asyncio.wait_for(served, 20) == 1
    finally:
        served.cancel()  # a no-op once it returned; else serve stops its listeners on the way out
        await asyncio.wait({served})
        await worker.stop()
        if task is not None:
            await asyncio.wait_for(task, 10)
        worker.close()


async def test_a_cancelled_scheduler_process_stops_its_listeners(tiny_llama_dir):
    """``serve`` cancelled (the process's main task, on the way out): both listeners stop
    first; a listener left running would outlive its event loop."""
    from alise.scheduler.config import SchedulerConfig
    from alise.scheduler.main import serve

    ports = free_ports(2)
    config = SchedulerConfig(address=f"127.0.0.1:{ports[0]}", worker_address=f"127.0.0.1:{ports[1]}",
                             model=str(tiny_llama_dir))
    served = asyncio.ensure_future(serve(config))
    for _ in range(600):
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await health_of(config.address) == health_pb2.HealthCheckResponse.SERVING:
                break
        await asyncio.sleep(0.05)
    served.cancel()
    await asyncio.wait({served})
    for port in ports:  # free to listen on again: nothing listens there now
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free a moment ago, for a process that takes its ports from flags."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


async def test_a_resumed_stream_goes_on_after_the_tokens_the_client_has(tiny_llama_dir):
    """A resume for a job this scheduler does not have (after the adoption grace) recomputes it
    from the prompt and the client's tokens; the stream starts at the next index and ends at
    max_tokens; greedy decoding gives the uninterrupted run's tokens."""
    from alise.client._convert import build_request, to_chunk
    from alise.v1 import scheduler_pb2_grpc

    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        c.scheduler.streams.adoption_grace_s = 0.0
        whole = await client.complete("resume me", max_tokens=12, temperature=0.0, ignore_eos=True)
        request = build_request("resume me", max_tokens=12, temperature=0.0, top_p=None, top_k=0, seed=None,
                                stop_token_ids=(), ignore_eos=True, request_id="again", oracle_output_tokens=0)
        request.resume_token_ids.extend(whole.token_ids[:5])
        async with grpc.aio.insecure_channel(c.address) as channel:
            chunks = [to_chunk(m) async for m in scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request)]
        assert chunks[0].index == 5
        assert whole.token_ids[:5] + [t for ch in chunks for t in ch.token_ids] == whole.token_ids
        assert chunks[-1].usage.completion_tokens == 12

        for resume, fragment in (([1] * 12, "the stream had ended"), ([10 ** 9], "must be in")):
            del request.resume_token_ids[:]
            request.resume_token_ids.extend(resume)
            async with grpc.aio.insecure_channel(c.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request):
                        pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


async def test_a_refused_resume_decodes_none_of_its_tokens(tiny_llama_dir, monkeypatch):
    """Resume tokens join a stream's text once its request has passed its checks (which bound
    them by the context): a refused request of 100k of them decodes none (16 MB of them took
    the event loop, and every stream and plan on it, 6 s before the refusal)."""
    from alise.client._convert import build_request
    from alise.scheduler.detokenizer import IncrementalDetokenizer
    from alise.v1 import scheduler_pb2_grpc

    decoded = []
    add = IncrementalDetokenizer.add
    monkeypatch.setattr(IncrementalDetokenizer, "add", lambda self, ids: decoded.append(len(ids)) or add(self, ids))
    async with cluster(str(tiny_llama_dir)) as c:
        request = build_request("resume me", max_tokens=12, temperature=0.0, top_p=None, top_k=0, seed=None,
                                stop_token_ids=(), ignore_eos=True, request_id="", oracle_output_tokens=0)
        request.resume_token_ids.extend([1] * 100_000)
        async with grpc.aio.insecure_channel(c.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request):
                    pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    assert max(decoded, default=0) < 100_000


async def test_a_worker_that_lost_its_scheduler_keeps_its_jobs_for_the_next_one(tiny_llama_dir, caplog):
    """The network between the worker and the scheduler fails mid-stream (a relay resets the
    connection): the worker pauses its jobs and lists them in its next hello. A scheduler that
    knows them (the same one: it re-queued them) has them aborted, not adopted; the stream goes
    on to its end."""
    caplog.set_level(logging.INFO, logger="alise.scheduler.engine")
    async with (cluster(str(tiny_llama_dir), num_workers=0) as c, TcpRelay(c.worker_address) as relay,
                c.client() as client):
        worker = await c.add_worker(str(tiny_llama_dir), via=relay.address)
        hello, held_in_hellos = worker.hello, []

        def spy():
            message = hello()
            held_in_hellos.append([h.job_id for h in message.hello.held_jobs])
            return message
        worker.hello = spy
        seen = 0
        async for chunk in client.generate("held across a break", max_tokens=60, ignore_eos=True,
                                           request_id="held"):
            seen += len(chunk.token_ids)
            if seen == 10:
                relay.cut()
        assert seen == 60
        for _ in range(100):  # its kept copy went at its next step boundary, the job at its end
            if not worker.engine.seqs:
                break
            await asyncio.sleep(0.05)
        assert not worker.engine.seqs and not worker._held
    assert ["held"] in held_in_hellos, held_in_hellos
    assert any("kept 1 jobs under this scheduler" in r.getMessage() and ": 0 adopted" in r.getMessage()
               for r in caplog.records)


async def test_a_worker_whose_read_is_cancelled_reconnects(tiny_llama_dir):
    """The task reading the worker's stream ends cancelled (nothing in the worker cancels it,
    but a cancellation may come from outside): the session ends, its jobs go back to the
    queue, and the worker connects again; the request is served."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        worker, run = c.workers[0]

        def session_read():
            return next(t for t in asyncio.all_tasks() if getattr(t.get_coro(), "cr_code", None)
                        is worker._read.__code__ and t.get_coro().cr_frame.f_locals.get("self") is worker)
        seen = 0
        async for chunk in client.generate("read cancelled", max_tokens=40, ignore_eos=True):
            seen += len(chunk.token_ids)
            if seen == 5:
                session_read().cancel()
        assert seen == 40 and not run.done()
        assert worker.connected.is_set()


async def test_the_advertised_token_budget_stays_within_the_mixed_step_graphs(tiny_llama_dir):
    """A step above the largest mixed-step graph runs eagerly: the worker's hello says so."""
    from alise.worker.config import WorkerConfig
    from alise.worker.service import Worker

    worker = Worker(WorkerConfig(model=str(tiny_llama_dir), health_address="", max_num_seqs=16,
                                 max_num_batched_tokens=256))
    await worker.load()
    runner = worker.engine.executor.runner
    assert worker.token_budget() == 256 and runner.mixed_graphs is None  # no graphs on the CPU
    runner.mixed_graphs = runner.make_mixed_graphs(tokens=[16, 32, 64])
    assert worker.token_budget() == 64 == worker.hello().hello.max_num_batched_tokens
    runner.mixed_graphs = runner.make_mixed_graphs(tokens=[8])
    assert worker.token_budget() == 16  # never under a full batch of decodes
    worker.close()


async def test_a_request_waiting_for_ready_is_served_by_a_scheduler_that_starts_later(tiny_llama_dir):
    """``wait_for_ready``: a request sent while nothing listens (a scheduler restarting) waits
    and is served once one starts; without it the same call fails at once with UNAVAILABLE."""
    from alise.client import AsyncClient, Unavailable

    address = f"127.0.0.1:{free_ports(1)[0]}"
    async with AsyncClient(address) as client:
        with pytest.raises(Unavailable):
            await client.complete("too early", max_tokens=4, timeout_s=10)
        waiting = asyncio.create_task(client.complete("wait for me", max_tokens=6, ignore_eos=True,
                                                      timeout_s=120, wait_for_ready=True))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        async with cluster(str(tiny_llama_dir), address=address, worker_address="127.0.0.1:0"):
            result = await asyncio.wait_for(waiting, 120)
    assert len(result.token_ids) == 6


async def test_a_worker_left_waiting_for_a_plan_gets_one_more_in_flight(tiny_llama_dir):
    """The loop stalls once (a sleep where a full garbage collection would be): the worker runs
    the plans it holds and waits, and the next dispatch finds it ran out (by the time gone: the
    reports of the steps run meanwhile come in one loop turn at a time) and keeps one more plan
    in flight from then on, up to ``plans_ahead`` (``alise.core.dispatch.FlightDepth``; on a
    loaded machine the worker may have run out before, by itself)."""
    async with cluster(str(tiny_llama_dir)) as c, c.client() as client:
        engine = c.scheduler.engine
        assert engine.min_plans_ahead < engine.plans_ahead
        dispatch, stalled = engine._dispatch, []

        def stall_once(now_s):
            dispatch(now_s)
            link = next(iter(engine.links.values()), None)
            if link is not None and link.num_steps >= 5 and not stalled:
                stalled.append(engine.depths[link.worker_id].num_drained)
                time.sleep(0.5)
        engine._dispatch = stall_once
        result = await client.complete("keep the worker busy", max_tokens=30, ignore_eos=True)
        [depth] = engine.depths.values()
    assert len(result.token_ids) == 30
    assert len(stalled) == 1 and depth.num_drained > stalled[0]
    assert depth.depth == engine.plans_ahead == engine.min_plans_ahead + 1
