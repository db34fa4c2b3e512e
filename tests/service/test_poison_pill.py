"""A request that crashes the scheduler's loop is recorded in its state dir before it exits;
the restarted scheduler refuses it when the SDK resends it, and serves the rest."""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import pytest

from alise.client import AliseError, AsyncClient
from alise.core.planner import StepPlanner
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_request_that_crashed_the_scheduler_is_refused_after_its_restart(tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    start = StepPlanner._start

    def start_or_crash(self, view, chosen, *args):
        for job in self.table.jobs[chosen].tolist():
            if "poison" in job.prompt_text:
                raise RuntimeError("injected: this request breaks the scheduler")
        return start(self, view, chosen, *args)
    monkeypatch.setattr(StepPlanner, "_start", start_or_crash)
    config = SchedulerConfig(address=f"127.0.0.1:{free_port()}", worker_address=f"127.0.0.1:{free_port()}",
                             model=str(tiny_llama_dir), state_dir=str(tmp_path / "scheduler"))
    first = await start_scheduler(config)
    worker = Worker(WorkerConfig(scheduler_address=config.worker_listen_address, model=str(tiny_llama_dir),
                                 health_address="", reconnect_delay_s=0.1))
    await worker.load()
    worker_task = asyncio.ensure_future(worker.run())
    second = None
    try:
        async with AsyncClient(config.address) as client:
            await client.complete("a healthy request", max_tokens=3)
            pill = asyncio.ensure_future(client.complete("the poison pill", max_tokens=4, request_id="pill"))
            await asyncio.wait_for(first.failed.wait(), 10)
            await first.stop(0.1)
            [entry] = json.loads((tmp_path / "scheduler" / "quarantine.json").read_text()).values()
            assert (entry["request_id"], entry["crashes"], entry["alone"]) == ("pill", 1, True)
            second = await start_scheduler(config)  # what `alise up` does: same flags, same state dir
            with pytest.raises(AliseError) as refused:  # the SDK resumed it; the new scheduler refuses
                await asyncio.wait_for(pill, 30)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "quarantined" in refused.value.details and "pill" in refused.value.details
            others = await asyncio.gather(*(client.complete(f"served {i}", max_tokens=3) for i in range(3)))
            assert [len(r.token_ids) for r in others] == [3, 3, 3]
            assert not second.failed.is_set()
    finally:
        await worker.stop()
        await asyncio.wait_for(worker_task, 10)
        worker.close()
        for scheduler in (first, second):  # the first again too: the test may end before its stop
            if scheduler is not None:
                await scheduler.stop(0.1)
