"""Services in processes of their own, for tests that freeze one (SIGSTOP) while the rest
run in the test's process: a worker dialing a given scheduler, or a whole in-process cluster
(scheduler and one worker) that prints its client address."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

_WORKER = """
import asyncio, sys
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker

async def main():
    worker = Worker(WorkerConfig(scheduler_address=sys.argv[1], model=sys.argv[2], worker_id=sys.argv[3],
                                 health_address="", reconnect_delay_s=0.1))
    await worker.load()
    await worker.run()
asyncio.run(main())
"""

_CLUSTER = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from cluster_fixtures import cluster

async def main():
    async with cluster(sys.argv[1]) as c:
        print(c.address, flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


@asynccontextmanager
async def process(code: str, *args: str):
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "ALISE_LOG_LEVEL": "WARNING"})
    try:
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        await asyncio.to_thread(proc.wait)


def worker_process(scheduler_address: str, model: str, worker_id: str):
    """A worker process dialing ``scheduler_address``."""
    return process(_WORKER, scheduler_address, model, worker_id)


@asynccontextmanager
async def cluster_process(model: str):
    """(process, client address) of a scheduler with one worker, in a process of its own."""
    async with process(_CLUSTER, model, str(Path(__file__).parent)) as proc:
        address = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        yield proc, address.strip()


def freeze(proc) -> None:
    os.kill(proc.pid, signal.SIGSTOP)


def thaw(proc) -> None:
    os.kill(proc.pid, signal.SIGCONT)
