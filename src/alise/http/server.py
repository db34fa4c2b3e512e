"""Runs the door: uvicorn on the HTTP address, a scheduler health poller, and optionally a
``grpc.health.v1`` listener so orchestrators probe the door the way they probe every other
ALISE service.

uvicorn serves through our own asyncio loop (``Server.serve``) on a socket we bind, so port 0
works and the bound port is known before the first request; its signal capture is turned off
because the entrypoint drains on SIGTERM itself (``run_until_signal``), as every service does.
Connections are bounded by the door's own protocol (``connections``), not by uvicorn's
``limit_concurrency``, which counts idle sockets; the process's open-file limit is raised to
its hard limit at start, so the connection limit, not the file limit, is what binds.

Stopping drains: the listener closes, requests in flight get ``drain_grace_s`` to finish, and
the streams still open then end with a last error event and ``[DONE]`` (whole completions
with a 503), never cut mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from dataclasses import dataclass

import grpc
import uvicorn

from alise.client import AsyncClient
from alise.common import grpc_server
from alise.common.logs import LogLimiter
from alise.http.app import Door, build_app
from alise.http.config import HttpConfig
from alise.http.connections import ConnectionGuard, guarded_protocol

logger = logging.getLogger(__name__)

#: What uvicorn gets beyond the drain grace to let the streams' last events out.
CLOSE_MARGIN_S = 5.0
#: File descriptors kept for everything but connections (gRPC channels, logs, the loop).
SPARE_FDS = 256


def raise_open_file_limit(max_connections: int) -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns it (warns when still short)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + SPARE_FDS:
        logger.warning("the open-file limit (%d) is below max_connections (%d) + %d: connections past "
                       "it are refused by the kernel, not answered", soft, max_connections, SPARE_FDS)
    return soft


class _UvicornLines(logging.Filter):
    """uvicorn logs one warning per malformed request: those lines (below ERROR) go out through
    a LogLimiter, so a flood of bad requests is no flood of lines."""

    def __init__(self) -> None:
        super().__init__()
        self.limiter = LogLimiter(logger)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.limiter.log(record.levelno, "uvicorn: %s", record.getMessage())
        return False


def _limit_uvicorn_lines() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _UvicornLines) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_UvicornLines())


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
    stopped: bool = False

    @property
    def base_url(self) -> str:
        return f"http://{self.door.config.address.rsplit(':', 1)[0]}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, lets in-flight requests finish within the grace period, ends the
        rest with a last event, then stops."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.door.config.drain_grace_s if grace_s is None else grace_s
        door = self.door
        door.draining = True
        if self.health_server is not None:
            await self.health_server.stop(grace)
        self.uvicorn.config.timeout_graceful_shutdown = grace + CLOSE_MARGIN_S
        self.uvicorn.should_exit = True
        deadline = time.monotonic() + grace
        while door.num_in_flight and time.monotonic() < deadline and not self.serving.done():
            await asyncio.sleep(0.05)
        if door.num_in_flight:
            logger.info("%d requests still in flight after %g s: ending them", door.num_in_flight, grace)
        door.closing.set()
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
    raise_open_file_limit(config.max_connections)
    _limit_uvicorn_lines()
    sock = bind_socket(config.address)
    client = AsyncClient(config.scheduler_address, tls_ca=config.scheduler_tls_ca)
    door = Door(config, client)
    await door.health.poll_once()
    guard = ConnectionGuard(max_connections=config.max_connections,
                            max_idle_per_client=config.max_idle_connections_per_client,
                            header_timeout_s=config.header_timeout_s, max_header_bytes=config.max_header_bytes)
    door.metrics.watch_connections(guard)
    uv_config = uvicorn.Config(
        build_app(door), http=guarded_protocol(guard), ws="none", lifespan="off", log_config=None,
        access_log=False, timeout_keep_alive=config.keep_alive_timeout_s,
        timeout_graceful_shutdown=config.drain_grace_s + CLOSE_MARGIN_S, backlog=4096,
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
