"""`alise http`: the OpenAI-compatible HTTP door in the foreground (imports nothing heavy until run)."""

from __future__ import annotations

import argparse
import functools
import os


@functools.cache
def flags():
    """A flag for each field of HttpConfig but the scheduler token, which is read from a file
    or the environment (never a flag: a command line is visible to every user of the host)."""
    from alise.common.entrypoint import ConfigFlag, config_flags
    from alise.http.config import HttpConfig

    return config_flags(
        HttpConfig,
        ConfigFlag("address", env="ALISE_HTTP_ADDRESS"),
        ConfigFlag("scheduler_address", name="scheduler", env="ALISE_ADDRESS"),
        ConfigFlag("served_model_name", env="ALISE_SERVED_MODEL_NAME", metavar="NAME"),
        ConfigFlag("health_address", env="ALISE_HTTP_HEALTH_ADDRESS"),
        ConfigFlag("request_timeout_s", name="request-timeout", metavar="S"),
        ConfigFlag("scheduler_tls_ca", env="ALISE_TLS_CA"),
        exclude=("scheduler_token",),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    from alise.common.entrypoint import add_config_flags
    from alise.http.config import HttpConfig

    add_config_flags(p, HttpConfig, flags())
    p.add_argument("--scheduler-token-file", default=None,
                   help="file holding a bearer token for the door's own scheduler calls (env ALISE_TOKEN; "
                        "default: none)")


def config_from_args(args: argparse.Namespace):
    from alise.common.entrypoint import build_config, config_values
    from alise.http.config import HttpConfig

    token = os.environ.get("ALISE_TOKEN") or None
    if args.scheduler_token_file:
        try:
            with open(args.scheduler_token_file, encoding="utf-8") as f:
                token = f.read().strip() or None
        except OSError as exc:
            raise ValueError(f"scheduler_token_file {args.scheduler_token_file!r}: {exc.strerror}") from None
    return build_config(HttpConfig, config_values(args, flags()), scheduler_token=token)


async def serve(config) -> None:
    import gc
    import logging

    from alise.common.grpc_server import run_until_signal, stop_on_signals
    from alise.http.server import start_http

    stop = stop_on_signals()  # before the start: a SIGTERM while it starts drains, never kills
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
    await run_until_signal(server.stop, stop)


def main(args: argparse.Namespace) -> int:
    from alise.common.entrypoint import run_service

    return run_service("http", args, config_from_args, serve,
                       lambda config: {"--address": config.address, "--health-address": config.health_address})
