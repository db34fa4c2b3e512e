"""Real processes (the compose file's commands) driven through the SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from compose_cluster import compose_commands, localize, start_compose_cluster

from alise.client import AsyncClient, Client
from alise.cluster.local import ClusterConfig, service_commands

pytestmark = pytest.mark.cluster


def test_compose_runs_the_same_commands_as_alise_up(tmp_path):
    ports = {p: p for p in (50051, 50052, 50053, 50060, 8000, 8001, 9400, 9401, 9402)}
    compose = localize(compose_commands(), tmp_path, ports)
    local = service_commands(ClusterConfig(address="127.0.0.1:50051", worker_address="127.0.0.1:50052",
                                           state_dir=str(tmp_path),
                                           num_workers=1, predictor_address="127.0.0.1:50053",
                                           metrics_base_port=9400))
    local["worker"] = local.pop("worker-0")
    worker_id = local["worker"].index("--worker-id")
    del local["worker"][worker_id:worker_id + 2]  # compose workers are named by their host
    assert compose == local
    assert ClusterConfig().policy == "alise"  # compose's default too: localize used it above


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("compose")
    cluster, address = start_compose_cluster(tmp, str(tiny_llama_dir), num_workers=2,
                                             worker_args=("--block-size", "4"))
    cluster.start()
    try:
        cluster.wait_healthy(240)
        yield cluster, address
    finally:
        codes = cluster.stop()
        print("exit codes", codes)


def test_generate_streams_through_processes(cluster):
    _, address = cluster
    with Client(address) as client:
        chunks = list(client.generate("hello from a real process", max_tokens=10, ignore_eos=True))
        status = client.status()
    assert sum(len(c.token_ids) for c in chunks) == 10
    assert chunks[-1].finish_reason == "length"
    assert len(status.workers) == 2


def test_cancel_and_concurrent_streams(cluster):
    _, address = cluster

    async def scenario():
        async with AsyncClient(address) as client:
            async def cancelled():
                n = 0
                async for chunk in client.generate("cancel me", max_tokens=400, ignore_eos=True):
                    n += len(chunk.token_ids)
                    if n >= 3:
                        break
                return n

            async def full(i):
                return await client.complete(f"stream {i}", max_tokens=12, ignore_eos=True)

            results = await asyncio.gather(cancelled(), full(1), full(2))
            for _ in range(100):
                status = await client.status()
                if status.num_running == 0 and all(
                        w["num_free_device_blocks"] == w["num_device_blocks"] for w in status.workers):
                    break
                await asyncio.sleep(0.1)
            return results, status

    (n_cancelled, a, b), status = asyncio.run(scenario())
    assert n_cancelled >= 3
    assert len(a.token_ids) == len(b.token_ids) == 12
    assert status.num_running == 0 and status.num_waiting == 0
    assert all(w["num_free_device_blocks"] == w["num_device_blocks"] for w in status.workers)


def test_worker_killed_mid_stream_others_finish_without_gaps(cluster):
    local, address = cluster

    async def scenario():
        async with AsyncClient(address) as client:
            async def run(i):
                chunks = []
                async for chunk in client.generate(f"survive {i}", max_tokens=60, ignore_eos=True,
                                                   temperature=0):
                    chunks.append(chunk)
                return chunks

            tasks = [asyncio.create_task(run(i)) for i in range(4)]
            await asyncio.sleep(1.0)
            victim = local.procs["worker-1"]
            os.kill(victim.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(scenario())
    for chunks in results:
        indices = [c.index for c in chunks]
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 60
        assert indices == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
    # The surviving worker is the only one connected, until the killed one is restarted.
    deadline = time.monotonic() + 10
    with Client(address) as client:
        while time.monotonic() < deadline and len(client.status().workers) != 1:
            time.sleep(0.1)
        assert [w["worker_id"] for w in client.status().workers] == ["worker-0"]
        local.start_one("worker-1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(client.status().workers) != 2:
            time.sleep(0.2)
        assert sorted(w["worker_id"] for w in client.status().workers) == ["worker-0", "worker-1"]


def test_sole_worker_killed_jobs_resume_when_it_returns(cluster):
    local, address = cluster
    local.procs["worker-1"].send_signal(signal.SIGTERM)
    assert local.procs["worker-1"].wait(30) == 0

    async def scenario():
        chunks = []
        async with AsyncClient(address) as client:
            async def run():
                async for c in client.generate("come back", max_tokens=200, ignore_eos=True):
                    chunks.append(c)
            task = asyncio.create_task(run())
            while sum(len(c.token_ids) for c in chunks) < 3:
                await asyncio.sleep(0.01)
            os.kill(local.procs["worker-0"].pid, signal.SIGKILL)
            await asyncio.sleep(1.0)
            assert not task.done()
            local.start_one("worker-0")
            await asyncio.wait_for(task, 300)
        return chunks

    chunks = asyncio.run(scenario())
    assert sum(len(c.token_ids) for c in chunks) == 200
    assert [c.index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
    local.start_one("worker-1")


def test_scheduler_killed_and_restarted_no_stream_loses_a_token(cluster):
    """kill -9 of the scheduler mid-stream: the workers keep their jobs and stay up, the
    restarted scheduler adopts them from their hellos, the SDK resumes every stream with its
    request id and the tokens it has, and each stream ends with all its tokens exactly once."""
    local, address = cluster
    predictor = local.commands.get("predictor")
    stats = (lambda: None) if predictor is None else \
        (lambda: _history_observations(predictor[predictor.index("--address") + 1]))
    before = stats()

    async def scenario():
        async with AsyncClient(address) as client:
            chunks = {i: [] for i in range(3)}

            async def run(i):
                async for chunk in client.generate(f"outlive the scheduler {i}", max_tokens=150,
                                                   ignore_eos=True, temperature=0):
                    chunks[i].append(chunk)

            tasks = [asyncio.create_task(run(i)) for i in range(3)]
            while min(sum(len(c.token_ids) for c in cs) for cs in chunks.values()) < 5:
                await asyncio.sleep(0.01)
            os.kill(local.procs["scheduler"].pid, signal.SIGKILL)
            local.procs["scheduler"].wait(10)
            await asyncio.sleep(0.5)
            assert not any(t.done() for t in tasks)
            local.start_one("scheduler")
            await asyncio.wait_for(asyncio.gather(*tasks), 240)
            return chunks

    chunks = asyncio.run(scenario())
    for cs in chunks.values():
        assert sum(len(c.token_ids) for c in cs) == 150
        assert [c.index for c in cs] == [sum(len(c.token_ids) for c in cs[:i]) for i in range(len(cs))]
    assert all(local.procs[name].poll() is None for name in ("worker-0", "worker-1"))
    with open(os.path.join(local.log_dir, "scheduler.log")) as f:
        log = f.read()
    assert "adopted" in log and "resumed at token" in log
    if before is not None:
        # The restarted scheduler observes each adopted job once, under its client's prompt.
        deadline = time.monotonic() + 30
        while stats() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert stats() == before + 3


def _history_observations(address: str) -> int:
    import grpc

    from alise.v1 import predictor_pb2, predictor_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        return stub.GetStats(predictor_pb2.GetStatsRequest(), timeout=10).history_observations


def test_sigterm_drains_every_service_and_exits_zero(cluster):
    local, address = cluster
    for name in ("worker-0", "worker-1"):
        deadline = time.monotonic() + 120
        from alise.cluster.local import health_address, is_serving
        while time.monotonic() < deadline and not is_serving(health_address(name, local.commands[name])):
            time.sleep(0.2)
    codes = local.stop(grace_s=30)
    assert codes == {name: 0 for name in local.commands}, codes
