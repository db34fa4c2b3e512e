"""`alise scheduler`: run the scheduler service in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging

from alise.common.entrypoint import ConfigFlag, add_config_flags, build_config, config_flags, config_values, run_service
from alise.common.grpc_server import run_until_signal, stop_on_signals
from alise.common.security import add_security_arguments, security_from_args
from alise.scheduler.config import SchedulerConfig

logger = logging.getLogger(__name__)

#: A flag for each field of SchedulerConfig (its security settings come from files and env,
#: ``add_security_arguments``); `alise up` hands its scheduler the same flags.
FLAGS = config_flags(
    SchedulerConfig,
    ConfigFlag("address", env="ALISE_SCHEDULER_ADDRESS"),
    ConfigFlag("worker_address", env="ALISE_SCHEDULER_WORKER_ADDRESS"),
    ConfigFlag("model", env="ALISE_MODEL"),
    ConfigFlag("scheduling.policy", env="ALISE_POLICY"),
    ConfigFlag("scheduling.kv_planner", env="ALISE_KV_PLANNER"),
    ConfigFlag("state_dir", env="ALISE_SCHEDULER_STATE_DIR"),
    ConfigFlag("predictor_address", name="predictor", env="ALISE_PREDICTOR_ADDRESS"),
    ConfigFlag("predictor_timeout_s", name="predictor-timeout", metavar="S"),
    ConfigFlag("latency_profile", env="ALISE_LATENCY_PROFILE"),
    ConfigFlag("max_model_len", metavar="TOKENS"),
    ConfigFlag("max_wait_no_worker_s", name="max-wait-no-worker", metavar="S"),
    ConfigFlag("job_log", env="ALISE_JOB_LOG"),
    ConfigFlag("metrics_address", env="ALISE_SCHEDULER_METRICS"),
    exclude=("security",),
)


def is_scheduling(flag: ConfigFlag) -> bool:
    return flag.field.startswith("scheduling.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, SchedulerConfig, [f for f in FLAGS if not is_scheduling(f)])
    add_config_flags(p.add_argument_group("scheduling (the same flags as `alise up` and `alise sim`)"),
                     SchedulerConfig, [f for f in FLAGS if is_scheduling(f)])
    add_security_arguments(p)


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return build_config(SchedulerConfig, config_values(args, FLAGS), security=security_from_args(args))


async def serve(config: SchedulerConfig) -> int:
    from alise.scheduler.service import start_scheduler

    stop = stop_on_signals()  # before the start: a SIGTERM while it starts drains, never kills
    predict = observe = None
    if config.predictor_address:
        from alise.scheduler.predictor_link import predictor_functions

        predict, observe = predictor_functions(config.predictor_address, config.security)
    server = await start_scheduler(config, predict=predict, observe=observe)
    drained = asyncio.ensure_future(run_until_signal(lambda: server.stop(config.drain_grace_s), stop))
    failed = asyncio.ensure_future(server.failed.wait())
    try:
        await asyncio.wait({drained, failed}, return_when=asyncio.FIRST_COMPLETED)
        if not failed.done():
            return 0
        logger.error("the scheduling loop failed; exiting (see the traceback above)")
        return 1
    finally:
        failed.cancel()
        if not drained.done():  # the loop failed, or this coroutine was cancelled
            drained.cancel()
            await server.stop(0.5)


def listeners(config: SchedulerConfig) -> dict[str, str]:
    return {"--address": config.address, "--worker-address": config.worker_listen_address,
            "--metrics-address": config.metrics_address}


def main(args: argparse.Namespace) -> int:
    return run_service("scheduler", args, config_from_args, serve, listeners)
