"""The shape every service's `main` shares: logging, validated config, run until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable

from alise.common.logs import configure_logging

logger = logging.getLogger(__name__)


def run_service(service: str, args: argparse.Namespace, config_from_args: Callable,
                serve: Callable[..., Awaitable[None]]) -> int:
    """Exit code 2 on a bad configuration (logged with the field and value), 0 after a drain,
    or what ``serve`` returns (a service that failed returns non-zero)."""
    configure_logging(service)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logger.error("bad configuration: %s", exc)
        return 2
    return asyncio.run(serve(config)) or 0
