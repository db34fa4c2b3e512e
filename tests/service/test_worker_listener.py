"""The worker API on a listener of its own, and who may register there: a rogue worker process
(bench/rogue_worker.py) dials each listener of each supported configuration while a client's
prompt waits for a worker, and reports what it was sent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alise.client import AsyncClient
from alise.common.security import SecurityConfig
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler
from alise.worker.config import WorkerConfig
from alise.worker.service import Worker

ROGUE = Path(__file__).resolve().parents[2] / "bench" / "rogue_worker.py"
TOKEN = "tok-31c9a0"
SECRET = "internal-77e2b4"
PROMPT = "the prompt nobody else may read"
CONFIGS = {
    "open": SecurityConfig(),
    "secret": SecurityConfig(internal_secret=SECRET),
    "secret+tokens": SecurityConfig(internal_secret=SECRET, api_tokens=(TOKEN,)),
}


async def run_rogue(address: str, server, *args: str) -> dict:
    info = server.servicer.info
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROGUE), address, "--model-id", info.model_id, "--vocab-size", str(info.vocab_size),
        *args, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def waiting_prompt(server, address: str, **client_kwargs) -> asyncio.Task:
    """A client's request, queued while no worker is connected."""
    async def ask():
        async with AsyncClient(address, **client_kwargs) as client:
            return await client.complete(PROMPT, max_tokens=2, ignore_eos=True)
    task = asyncio.create_task(ask())
    while server.streams.num_live() == 0:
        await asyncio.sleep(0.02)
    return task


@pytest.mark.parametrize("config, listener, rogue_args, code", [
    ("open", "client", (), "UNIMPLEMENTED"),
    ("secret", "worker", (), "UNAUTHENTICATED"),
    ("secret", "worker", ("--secret", "guessed"), "UNAUTHENTICATED"),
    ("secret", "client", (), "UNAUTHENTICATED"),
    ("secret+tokens", "worker", ("--secret", TOKEN), "UNAUTHENTICATED"),   # a client's token is no worker's
    ("secret+tokens", "client", ("--secret", SECRET), "UNIMPLEMENTED"),   # no workers on the client port
])
async def test_a_rogue_worker_reaches_no_prompt(tiny_llama_dir, config, listener, rogue_args, code):
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir),
                                                   security=CONFIGS[config]))
    client_address = f"127.0.0.1:{server.port}"
    try:
        waiting = await waiting_prompt(server, client_address, token=TOKEN if "tokens" in config else None)
        port = server.port if listener == "client" else server.worker_port
        result = await run_rogue(f"127.0.0.1:{port}", server, *rogue_args)
        assert result == {"code": code, "prompts": []}
        assert not server.engine.links
        waiting.cancel()
    finally:
        await server.stop(0.1)


async def test_an_open_worker_listener_is_warned_and_open_to_local_processes(tiny_llama_dir, caplog):
    """The one configuration without a worker credential (every listener on loopback, no API
    tokens): the scheduler says it is open, and a local process can indeed take prompts."""
    caplog.set_level(logging.WARNING)
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir)))
    try:
        assert f"the worker listener 127.0.0.1:{server.worker_port} is open" in caplog.text
        waiting = await waiting_prompt(server, f"127.0.0.1:{server.port}")
        result = await run_rogue(f"127.0.0.1:{server.worker_port}", server, "--seconds", "4")
        assert result["prompts"] == [server.servicer.info.tokenizer.encode(PROMPT)]
        waiting.cancel()
    finally:
        await server.stop(0.1)


@pytest.mark.parametrize("overrides, says", [
    (dict(security=SecurityConfig(api_tokens=(TOKEN,))), "API tokens are set but workers need no credential"),
    (dict(address="0.0.0.0:50051"), "address 0.0.0.0:50051 is not loopback-only"),
    (dict(worker_address="0.0.0.0:50052"), "worker_address 0.0.0.0:50052 is not loopback-only"),
    (dict(address="10.1.2.3:50051", worker_address="127.0.0.1:50052"), "is not loopback-only"),
    (dict(address="127.0.0.1:6000", worker_address="127.0.0.1:6000"), "must be different ports"),
])
def test_a_worker_listener_without_credential_is_refused_where_others_reach_it(overrides, says):
    with pytest.raises(ValueError, match=says):
        SchedulerConfig(**overrides)


def test_with_a_worker_credential_any_address_is_allowed():
    config = SchedulerConfig(address="0.0.0.0:50051", worker_address="0.0.0.0:50052",
                             security=SecurityConfig(internal_secret=SECRET, api_tokens=(TOKEN,)))
    assert config.worker_listen_address == "0.0.0.0:50052"
    assert SchedulerConfig(address="127.0.0.1:7000").worker_listen_address == "127.0.0.1:7001"
    assert SchedulerConfig(address="0.0.0.0:0", security=CONFIGS["secret"]).worker_listen_address == "127.0.0.1:0"


def test_the_scheduler_command_exits_2_with_tokens_and_no_worker_credential(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    out = subprocess.run([sys.executable, "-m", "alise.cli.main", "scheduler", "--address", "127.0.0.1:0",
                          "--api-token-file", str(tokens)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ALISE_INTERNAL_SECRET": ""})
    assert out.returncode == 2
    assert "bad configuration: API tokens are set but workers need no credential" in out.stderr


@pytest.fixture(scope="module")
def mtls_files(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a worker's client certificate, both signed by it."""
    d = tmp_path_factory.mktemp("mtls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=alise-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("worker", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "worker.pem", "worker.key")}


async def test_mutual_tls_on_the_worker_listener(tiny_llama_dir, mtls_files):
    """--tls-client-ca: a worker needs a certificate from that CA (a rogue without one fails the
    handshake); clients of the client listener need none."""
    f = mtls_files
    security = SecurityConfig(tls_cert=f["server.pem"], tls_key=f["server.key"], tls_client_ca=f["ca.pem"])
    server = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model=str(tiny_llama_dir),
                                                   security=security))
    worker = None
    try:
        waiting = await waiting_prompt(server, f"127.0.0.1:{server.port}", tls_ca=f["ca.pem"])
        result = await run_rogue(f"127.0.0.1:{server.worker_port}", server, "--tls-ca", f["ca.pem"])
        assert result == {"code": "UNAVAILABLE", "prompts": []}
        worker = Worker(WorkerConfig(
            scheduler_address=f"127.0.0.1:{server.worker_port}", model=str(tiny_llama_dir), health_address="",
            worker_id="w-mtls", security=SecurityConfig(tls_ca=f["ca.pem"], tls_cert=f["worker.pem"],
                                                        tls_key=f["worker.key"])))
        await worker.load()
        task = asyncio.create_task(worker.run())
        out = await asyncio.wait_for(waiting, 60)
        assert len(out.token_ids) == 2
        await worker.stop()
        await task
    finally:
        if worker is not None:
            worker.close()
        await server.stop(0.1)
