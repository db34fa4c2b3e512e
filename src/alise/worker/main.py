"""`alise worker`: run one model replica that dials the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from alise.common.entrypoint import ConfigFlag, add_config_flags, build_config, config_flags, config_values, run_service
from alise.common.security import add_security_arguments, security_from_args
from alise.worker.config import WorkerConfig

logger = logging.getLogger(__name__)


#: A flag for each field of WorkerConfig (its security settings come from files and env,
#: ``add_security_arguments``); `alise up` hands its workers the same flags.
FLAGS = config_flags(
    WorkerConfig,
    ConfigFlag("scheduler_address", name="scheduler", env="ALISE_SCHEDULER_WORKER_ADDRESS"),
    ConfigFlag("model", env="ALISE_MODEL"),
    ConfigFlag("device", env="ALISE_DEVICE"),
    ConfigFlag("gpu_memory_utilization", metavar="FRACTION"),
    ConfigFlag("max_num_seqs", metavar="N"),
    ConfigFlag("max_num_batched_tokens", metavar="N"),
    ConfigFlag("max_model_len", metavar="TOKENS"),
    ConfigFlag("worker_id", env="ALISE_WORKER_ID"),
    ConfigFlag("health_address", env="ALISE_WORKER_HEALTH_ADDRESS"),
    ConfigFlag("orphan_ttl_s", name="orphan-ttl", metavar="S"),
    ConfigFlag("latency_profile", env="ALISE_LATENCY_PROFILE"),
    ConfigFlag("step_log", env="ALISE_WORKER_STEP_LOG"),
    ConfigFlag("kernel_plan", env="ALISE_KERNEL_PLAN"),
    ConfigFlag("runner", env="ALISE_WORKER_RUNNER"),
    ConfigFlag("metrics_address", env="ALISE_WORKER_METRICS"),
    exclude=("security",),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, WorkerConfig, FLAGS)
    add_security_arguments(p, server=False)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return build_config(WorkerConfig, config_values(args, FLAGS), security=security_from_args(args))


async def serve(config: WorkerConfig) -> None:
    from alise.worker.service import Worker

    # The step thread must get the interpreter back as soon as a step's device work is done: the
    # event loop's thread (reports, plans) then yields within half a millisecond, not Python's 5.
    sys.setswitchinterval(0.0005)

    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    await worker.start_health()
    if worker.health_port:
        logger.info("worker health on port %d", worker.health_port)
    await worker.load()
    try:
        await worker.run()
    finally:
        worker.close()


def listeners(config: WorkerConfig) -> dict[str, str]:
    return {"--health-address": config.health_address, "--metrics-address": config.metrics_address}


def main(args: argparse.Namespace) -> int:
    return run_service("worker", args, config_from_args, serve, listeners)
