"""Bearer tokens, the internal secret and TLS, through real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import subprocess

import grpc
import pytest

from alise.client import AsyncClient, Unauthenticated
from alise.common.security import SecurityConfig
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker

TOKEN = "tok-8f2e1c"
SECRET = "internal-5b7d"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


async def start(model: str, security: SecurityConfig, worker_security: SecurityConfig | None):
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=model,
                                                   security=security, max_wait_no_worker_s=2))
    address = f"127.0.0.1:{server.port}"
    worker = None
    if worker_security is not None:
        worker = Worker(WorkerConfig(scheduler_address=f"127.0.0.1:{server.worker_port}", model=model,
                                     health_address="", worker_id="w0", security=worker_security,
                                     reconnect_delay_s=0.2))
        await worker.load()
        task = asyncio.create_task(worker.run())
        worker.task = task
    return server, address, worker


async def stop(server, worker):
    if worker is not None:
        await worker.stop()
        await worker.task
        worker.close()
    await server.stop(0.1)


async def test_bearer_token_required_and_never_logged(tiny_llama_dir, caplog):
    caplog.set_level(logging.DEBUG)
    sec = SecurityConfig(api_tokens=(TOKEN,), internal_secret=SECRET)
    server, address, worker = await start(str(tiny_llama_dir), sec, SecurityConfig(internal_secret=SECRET))
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        for token in (None, "wrong-token", TOKEN + "x"):
            async with AsyncClient(address, token=token) as client:
                with pytest.raises(Unauthenticated, match="missing or invalid credential"):
                    await client.complete("hi", max_tokens=2)
                with pytest.raises(Unauthenticated):
                    await client.status()
        async with AsyncClient(address, token=TOKEN) as client:
            out = await client.complete("hi", max_tokens=3, ignore_eos=True)
            assert len(out.token_ids) == 3
        # Health stays open for probes.
        async with grpc.aio.insecure_channel(address) as channel:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop(server, worker)
    assert "refused a call" in caplog.text
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text and SECRET not in caplog.text


async def test_worker_without_the_internal_secret_cannot_join(tiny_llama_dir):
    sec = SecurityConfig(internal_secret=SECRET)
    server, address, worker = await start(str(tiny_llama_dir), sec, SecurityConfig(internal_secret="nope"))
    try:
        await asyncio.sleep(1.0)
        assert not server.engine.links, "a worker with the wrong secret was admitted"
        assert not worker.connected.is_set()
    finally:
        await stop(server, worker)


async def test_tls_listener(tiny_llama_dir, tls_files):
    cert, key = tls_files
    sec = SecurityConfig(tls_cert=cert, tls_key=key)
    server, address, worker = await start(str(tiny_llama_dir), sec, SecurityConfig(tls_ca=cert))
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        async with AsyncClient(address, tls_ca=cert) as client:
            out = await client.complete("secure", max_tokens=2, ignore_eos=True)
            assert len(out.token_ids) == 2
        async with AsyncClient(address, timeout_s=2) as plain:
            with pytest.raises(Exception) as info:
                await plain.complete("plain", max_tokens=2)
            assert "UNAVAILABLE" in str(info.value) or "DEADLINE" in str(info.value)
    finally:
        await stop(server, worker)
