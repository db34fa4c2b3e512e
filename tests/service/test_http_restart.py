"""The door while its scheduler restarts, hangs or is gone, and while the door itself stops:
bounded waits, a retryable 503 with Retry-After that names no internal address, /health that
one slow check does not flip, and open streams ended with a last event instead of cut."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from http_support import start_live_door

from alise.http.config import HttpConfig
from alise.http.server import start_http
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler

STREAM = {"prompt": "queued", "max_tokens": 2, "stream": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_request_waits_a_bounded_time_for_a_scheduler_that_is_down():
    port = free_port()
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=f"127.0.0.1:{port}",
                                       health_interval_s=0.05, scheduler_wait_s=1.0))
    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=30) as client:
            started = time.monotonic()
            reply = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            waited = time.monotonic() - started
            assert reply.status_code == 503 and 0.9 < waited < 3.0, (reply.text, waited)
            assert int(reply.headers["retry-after"]) >= 1
            assert str(port) not in reply.text and "127.0.0.1" not in reply.text
            health = await client.get("/health")
            assert health.status_code == 503 and str(port) not in health.text
            models = await client.get("/v1/models")
            assert models.status_code == 503 and str(port) not in models.text and "retry-after" in models.headers
    finally:
        await http.stop(0.2)


async def test_a_request_sent_during_a_restart_is_served_when_the_scheduler_is_back():
    port = free_port()
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=f"127.0.0.1:{port}",
                                       health_interval_s=0.05, scheduler_wait_s=8.0))
    scheduler = None
    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=30) as client:
            async def send() -> int:
                async with client.stream("POST", "/v1/completions", json=STREAM) as reply:
                    return reply.status_code  # a stream's status line comes when it is accepted

            sent = asyncio.create_task(send())
            await asyncio.sleep(1.0)  # the scheduler is down for a second, then starts
            scheduler = await start_scheduler(SchedulerConfig(address=f"127.0.0.1:{port}", worker_address="127.0.0.1:0",
                                                              model="tiny-llama", max_wait_no_worker_s=30))
            assert await asyncio.wait_for(sent, 15) == 200  # accepted, and queued: there is no worker
    finally:
        await http.stop(0.2)
        if scheduler is not None:
            await scheduler.stop(0.1)


async def test_a_door_started_before_its_scheduler_learns_the_model_before_the_first_request():
    """The model lookup (a tokenizer's chat template to load: seconds on a cold start) is
    every request's first wait: a door whose scheduler comes up after it keeps trying, so the
    first request does not pay for it (it used to try once at start and leave it to that request)."""
    port = free_port()
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=f"127.0.0.1:{port}",
                                       health_interval_s=0.05, scheduler_wait_s=0.5))
    scheduler = None
    try:
        await asyncio.sleep(1.0)  # the door's first lookup has given up
        scheduler = await start_scheduler(SchedulerConfig(address=f"127.0.0.1:{port}", worker_address="127.0.0.1:0",
                                                          model="tiny-llama"))
        deadline = time.monotonic() + 15
        while http.door._served is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert http.door._served is not None and http.door._served.root == "tiny-llama"
        assert not http.door.warming.done() or http.door.warming.exception() is None
    finally:
        await http.stop(0.2)
        if scheduler is not None:
            await scheduler.stop(0.1)


@pytest.fixture()
def stopped_scheduler(tmp_path):
    """A scheduler in a process of its own, to SIGSTOP: (address, process)."""
    port = free_port()
    log = open(tmp_path / "scheduler.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "alise.cli.main", "scheduler", "--address", f"127.0.0.1:{port}",
                             "--worker-address", "127.0.0.1:0", "--model", "tiny-llama"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"listening for clients" not in (tmp_path / "scheduler.log").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
        time.sleep(0.1)
    yield f"127.0.0.1:{port}", proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(30)
    log.close()


async def test_a_hung_scheduler_gets_a_retryable_503_within_two_seconds(stopped_scheduler):
    address, proc = stopped_scheduler
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=address, health_interval_s=0.2,
                                       health_timeout_s=0.5, health_failures=3))
    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=30) as client:
            assert (await client.get("/health")).status_code == 200
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            reply = await client.post("/v1/completions", json=STREAM)
            assert reply.status_code == 503 and time.monotonic() - started <= 2.0, reply.text
            assert int(reply.headers["retry-after"]) >= 1 and address not in reply.text
            # Under a second of silence is fewer than three failed checks: /health holds.
            assert (await client.get("/health")).status_code == 200
            os.kill(proc.pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
            assert (await client.get("/health")).status_code == 200
            os.kill(proc.pid, signal.SIGSTOP)  # stopped for good: three failed checks flip it
            for _ in range(60):
                if (await client.get("/health")).status_code == 503:
                    break
                await asyncio.sleep(0.1)
            assert (await client.get("/health")).status_code == 503
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        await http.stop(0.2)


@pytest.fixture()
def live(tiny_llama_dir, tmp_path):
    door, stop = start_live_door(str(tiny_llama_dir), tmp_path / "jobs.jsonl")
    yield door
    stop()


def test_stopping_the_door_ends_open_streams_with_a_last_event(live):
    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0) as client:
        stream = client.completions.create(model=str(live.cluster.scheduler.servicer.info.name), prompt="go on",
                                           max_tokens=200, stream=True, extra_body={"ignore_eos": True})
        seen = 0
        stopping = None
        with pytest.raises(openai.APIError, match="shutting down") as info:
            for _ in stream:
                seen += 1
                if seen == 3:  # what SIGTERM runs: the drain, with a short grace
                    stopping = asyncio.run_coroutine_threadsafe(live.http.stop(0.3), live.loop)
        assert seen >= 3 and info.value.body["code"] == "shutting_down"
        stopping.result(30)
    live.wait_idle()  # the ended stream's job was cancelled
