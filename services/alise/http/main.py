"""`alise http`: the OpenAI-compatible HTTP door in the foreground (imports nothing heavy until run)."""

from __future__ import annotations

import argparse
import os


def _bound_flags():
    """The bounds on connections and waits: flags read from HttpConfig's fields."""
    from alise.common.entrypoint import ConfigFlag

    return (
        ConfigFlag("max_idle_connections_per_client", "connections one client (remote IP) may hold with no "
                   "request in progress; past it, its longest idle is closed", metavar="N"),
        ConfigFlag("header_timeout_s", "seconds a connection has to send its request line and headers (408)",
                   metavar="S"),
        ConfigFlag("body_timeout_s", "seconds a request has to send its body (408)", metavar="S"),
        ConfigFlag("max_header_bytes", "largest request line and headers (431 beyond)", metavar="N"),
        ConfigFlag("keep_alive_timeout_s", "seconds a kept-alive connection may sit idle", metavar="S"),
        ConfigFlag("scheduler_wait_s", "seconds a request waits for a scheduler that cannot be reached (a "
                   "restart) before 503 with Retry-After", metavar="S"),
        ConfigFlag("accept_timeout_s", "seconds a request waits for a reachable scheduler to accept it "
                   "before 503 with Retry-After", metavar="S"),
        ConfigFlag("health_failures", "health checks in a row that must fail before /health says 503",
                   metavar="N"),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    from alise.common.entrypoint import add_config_flags
    from alise.http.config import DEFAULT_ADDRESS, HttpConfig

    env = os.environ.get
    p.add_argument("--scheduler", dest="scheduler_address", default=env("ALISE_ADDRESS", "127.0.0.1:50051"),
                   help="the scheduler's gRPC address (default %(default)s)")
    p.add_argument("--address", default=env("ALISE_HTTP_ADDRESS", DEFAULT_ADDRESS),
                   help="HTTP listen address, HOST:PORT (default %(default)s, vLLM's port)")
    p.add_argument("--served-model-name", default=env("ALISE_SERVED_MODEL_NAME") or None,
                   help="the model name clients send and /v1/models lists (default: the scheduler's model)")
    p.add_argument("--model", default=None,
                   help="model directory whose chat template renders chat messages (default: the "
                        "scheduler's model when it is a local directory, else the plain template)")
    p.add_argument("--health-address", default=env("ALISE_HTTP_HEALTH_ADDRESS", ""),
                   help="also serve grpc.health.v1 here (SERVING while the scheduler is); default: none")
    p.add_argument("--request-timeout", type=float, default=600.0, dest="request_timeout_s",
                   help="deadline of one generation in seconds (504 past it; default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest request body (413 beyond; default %(default)s)")
    p.add_argument("--max-connections", type=int, default=8192,
                   help="open connections at most: past it the longest idle is closed, and with none idle "
                        "the new one is answered 503 (default %(default)s)")
    add_config_flags(p, HttpConfig, _bound_flags())
    p.add_argument("--scheduler-token-file", default=None,
                   help="file holding a bearer token for the door's own scheduler calls (env ALISE_TOKEN)")
    p.add_argument("--scheduler-tls-ca", default=env("ALISE_TLS_CA"), help="CA of a TLS scheduler (PEM)")
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) for HTTPS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) for HTTPS")


def config_from_args(args: argparse.Namespace):
    from alise.common.entrypoint import config_values
    from alise.http.config import HttpConfig

    token = os.environ.get("ALISE_TOKEN") or None
    if args.scheduler_token_file:
        try:
            with open(args.scheduler_token_file, encoding="utf-8") as f:
                token = f.read().strip() or None
        except OSError as exc:
            raise ValueError(f"scheduler_token_file {args.scheduler_token_file!r}: {exc.strerror}") from None
    return HttpConfig(address=args.address, scheduler_address=args.scheduler_address,
                      served_model_name=args.served_model_name, model=args.model,
                      health_address=args.health_address, request_timeout_s=args.request_timeout_s,
                      max_body_bytes=args.max_body_bytes, max_connections=args.max_connections,
                      scheduler_token=token, scheduler_tls_ca=args.scheduler_tls_ca,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, **config_values(args, _bound_flags()))


async def serve(config) -> None:
    import gc
    import logging

    from alise.common.grpc_server import run_until_signal
    from alise.http.server import start_http

    try:
        server = await start_http(config)
    except OSError as exc:  # the port is taken, the address is not local, ...
        logging.getLogger(__name__).error("%s", exc)
        raise SystemExit(1) from None
    # What start-up built lives as long as the process: kept out of the collector's full
    # sweeps, so a flood of short-lived connections does not pay for traversing it again and
    # again (pauses of the event loop); vLLM's server does the same.
    gc.collect()
    gc.freeze()
    await run_until_signal(server.stop)


def main(args: argparse.Namespace) -> int:
    from alise.common.entrypoint import run_service

    return run_service("http", args, config_from_args, serve,
                       lambda config: {"--address": config.address, "--health-address": config.health_address})
