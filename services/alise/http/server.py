"""Runs the door: uvicorn on the HTTP address, a scheduler health poller, and optionally a
``grpc.health.v1`` listener so orchestrators probe the door the way they probe every other
ALISE service.

uvicorn serves through our own asyncio loop (``Server.serve``) on a socket we bind, so port 0
works and the bound port is known before the first request; its signal capture is turned off
because the entrypoint drains on SIGTERM itself (``run_until_signal``), as every service does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import grpc
import uvicorn
from alise.client import AsyncClient
from alise.common import grpc_server
from alise.http.app import Door, build_app
from alise.http.config import HttpConfig

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()


def bind_socket(address: str) -> socket.socket:
    host, port = grpc_server.split_host_port(address)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it Nagle holds an event back until the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class HttpServer:
    door: Door
    port: int
    uvicorn: _Uvicorn
    serving: asyncio.Task
    poller: asyncio.Task
    health_server: grpc.aio.Server | None = None
    health_port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.door.config.address.rsplit(':', 1)[0]}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, lets in-flight requests finish within the grace period, then stops."""
        grace = self.door.config.drain_grace_s if grace_s is None else grace_s
        if self.health_server is not None:
            await self.health_server.stop(grace)
        self.uvicorn.config.timeout_graceful_shutdown = grace
        self.uvicorn.should_exit = True
        await self.serving
        for task in (self.poller, self.door.warming):
            task.cancel()
        await asyncio.gather(self.poller, self.door.warming, return_exceptions=True)
        await self.door.client.close()
        logger.info("stopped")


async def _start_health(config: HttpConfig, door: Door) -> tuple[grpc.aio.Server, int]:
    server = grpc_server.create_server()
    status = await grpc_server.add_health_and_reflection(server, [])
    await status.set(door.health.is_serving)
    door.health.on_change = lambda serving: asyncio.ensure_future(status.set(serving))
    port = grpc_server.bind(server, config.health_address)
    await server.start()
    return server, port


async def start_http(config: HttpConfig) -> HttpServer:
    sock = bind_socket(config.address)
    client = AsyncClient(config.scheduler_address, tls_ca=config.scheduler_tls_ca)
    door = Door(config, client)
    await door.health.poll_once()
    uv_config = uvicorn.Config(
        build_app(door), http="httptools", ws="none", lifespan="off", log_config=None, access_log=False,
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=config.drain_grace_s,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key, server_header=False)
    server = _Uvicorn(uv_config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # raises the start-up error
            raise RuntimeError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    port = sock.getsockname()[1]
    health_server, health_port = (await _start_health(config, door)) if config.health_address else (None, 0)
    poller = asyncio.create_task(door.health.run())
    door.warming = asyncio.create_task(door.warm_up())
    scheme = "https" if config.tls_cert else "http"
    logger.info("HTTP door on %s://%s:%d for the scheduler at %s (scheduler %s)", scheme,
                config.address.rsplit(":", 1)[0], port, config.scheduler_address, door.health.status)
    return HttpServer(door, port, server, serving, poller, health_server, health_port)
