"""Logging set-up shared by the service entrypoints."""

from __future__ import annotations

import logging
import os


def configure_logging(service: str, level: str | None = None) -> None:
    level_name = (level or os.environ.get("ALISE_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=getattr(logging, level_name, logging.INFO),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
