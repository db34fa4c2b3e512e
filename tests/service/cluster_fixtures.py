"""In-process scheduler + workers on loopback port 0, for service tests."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from alise.client import AsyncClient
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import SchedulerServer, start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker


@dataclass
class InProcessCluster:
    scheduler: SchedulerServer
    #: The client listener (SDK calls) and the worker listener (workers dial it).
    address: str
    worker_address: str
    workers: list[tuple[Worker, asyncio.Task]] = field(default_factory=list)

    async def add_worker(self, model: str, *, via: str = "", **overrides) -> Worker:
        """A worker that dials the worker listener, or ``via`` (an address in front of it)."""
        cfg = WorkerConfig(scheduler_address=via or self.worker_address, model=model, health_address="",
                           worker_id=f"w{len(self.workers)}", reconnect_delay_s=0.1, **overrides)
        worker = Worker(cfg)
        await worker.load()
        task = asyncio.create_task(worker.run())
        self.workers.append((worker, task))
        await asyncio.wait_for(worker.connected.wait(), 10)
        return worker

    async def remove_worker(self, worker: Worker) -> None:
        """Stops the worker; its run task's failure, if any, is raised once it is stopped."""
        for i, (w, task) in enumerate(self.workers):
            if w is worker:
                del self.workers[i]
                try:
                    await w.stop()
                    await asyncio.wait_for(task, 10)
                finally:
                    task.cancel()
                    w.close()
                return

    def client(self, **kwargs) -> AsyncClient:
        return AsyncClient(self.address, **kwargs)

    async def close(self) -> None:
        """Stops every worker and the scheduler, whatever fails on the way (a
        failure is raised after): a gRPC server left running outlives the test's event loop,
        and its finalizer then fails, or hangs, at interpreter exit."""
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.scheduler.stop, 0.1)
            for worker, _ in self.workers:
                stack.push_async_callback(self.remove_worker, worker)


@contextlib.asynccontextmanager
async def cluster(model: str, *, num_workers: int = 1, worker_overrides: dict | None = None,
                  address: str = "127.0.0.1:0", **scheduler_overrides):
    config = SchedulerConfig(address=address, model=model, **scheduler_overrides)
    scheduler = await start_scheduler(config)
    c = InProcessCluster(scheduler, f"127.0.0.1:{scheduler.port}", f"127.0.0.1:{scheduler.worker_port}")
    try:
        for _ in range(num_workers):
            await c.add_worker(model, **(worker_overrides or {}))
        yield c
    finally:
        await c.close()
