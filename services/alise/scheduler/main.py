"""`alise scheduler`: run the scheduler service in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from alise.common.grpc_server import run_until_signal
from alise.common.entrypoint import ConfigFlag, add_config_flags, run_service
from alise.common.security import add_security_arguments, security_from_args
from alise.scheduler.config import SchedulerConfig

logger = logging.getLogger(__name__)

#: The scheduler's flags under vLLM's names; `alise up` hands them on.
ENGINE_FLAGS = (
    ConfigFlag("max_model_len", "context limit in tokens, prompt and output (default: the model's)",
               metavar="TOKENS"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--address", default=env("ALISE_SCHEDULER_ADDRESS", "127.0.0.1:50051"),
                   help="listen address for clients (env ALISE_SCHEDULER_ADDRESS; default %(default)s)")
    p.add_argument("--worker-address", default=env("ALISE_SCHEDULER_WORKER_ADDRESS", ""),
                   help="listen address for workers, a listener of its own (env "
                        "ALISE_SCHEDULER_WORKER_ADDRESS; default: 127.0.0.1 and the --address port + 1). "
                        "Workers must give the internal secret (or a client certificate with "
                        "--tls-client-ca) unless every listener is on loopback and no API tokens are set")
    p.add_argument("--model", default=env("ALISE_MODEL") or None,
                   help="model directory or preset name, the one the workers serve (env "
                        "ALISE_MODEL; default: the embedded tiny-llama)")
    p.add_argument("--policy", default=env("ALISE_POLICY", SchedulerConfig.policy), choices=["fcfs", "alise", "oracle"],
                   help="scheduling policy: alise (shortest predicted remaining time, with the "
                        "predictor), fcfs (arrival order), oracle (true lengths, for benchmarks) "
                        "(env ALISE_POLICY; default %(default)s)")
    p.add_argument("--kv-planner", default=env("ALISE_KV_PLANNER") or None,
                   choices=["adaptive", "drop", "swap", "quantize"],
                   help="where paused jobs' KV goes (env ALISE_KV_PLANNER; default: drop for fcfs, "
                        "adaptive otherwise)")
    p.add_argument("--job-log", default=env("ALISE_JOB_LOG", ""),
                   help="append a JSON line per finished job (estimate, length, latencies) to this "
                        "file (env ALISE_JOB_LOG; default: none)")
    add_config_flags(p, SchedulerConfig, ENGINE_FLAGS)
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that leaves it unset")
    p.add_argument("--max-queued", type=int, default=4096,
                   help="requests in flight (queued + running) before RESOURCE_EXHAUSTED")
    p.add_argument("--max-calls", type=int, default=0,
                   help="calls in progress on the client listener before RESOURCE_EXHAUSTED, health "
                        "checks not counted (default 0: --max-queued + 1024)")
    p.add_argument("--max-wait-no-worker", type=float, default=30.0, dest="max_wait_no_worker_s",
                   help="seconds a request waits while no worker is connected before UNAVAILABLE")
    p.add_argument("--prefill-step-ratio", type=float, default=1.5,
                   help="a step with prompt chunks beside decodes costs at most this many times the decode "
                        "step alone, by the workers' latency profile (0 = no cap; default %(default)s)")
    p.add_argument("--plans-ahead", type=int, default=2,
                   help="plans kept in flight per worker, so it never waits for the next one "
                        "(1 = lock-step; default %(default)s)")
    p.add_argument("--predictor", default=env("ALISE_PREDICTOR_ADDRESS"), dest="predictor_address",
                   help="predictor address (env ALISE_PREDICTOR_ADDRESS; default: none, "
                        "running-mean estimates)")
    p.add_argument("--predictor-timeout", type=float, default=0.25, dest="predictor_timeout_s",
                   help="seconds one predictor call may take before the running mean stands in")
    p.add_argument("--latency-profile", default=env("ALISE_LATENCY_PROFILE"),
                   help="latency profile JSON of the workers' device (env ALISE_LATENCY_PROFILE; "
                        "default: the first worker's, corrected online)")
    p.add_argument("--state-dir", default=env("ALISE_SCHEDULER_STATE_DIR", ""),
                   help="directory of the scheduler's state: the requests that crashed it, refused "
                        "after a restart (env ALISE_SCHEDULER_STATE_DIR; default: none, kept in memory)")
    p.add_argument("--metrics-address", default=env("ALISE_SCHEDULER_METRICS", ""),
                   help="serve Prometheus metrics over HTTP here, e.g. 127.0.0.1:9400 (env "
                        "ALISE_SCHEDULER_METRICS; default: none)")
    add_security_arguments(p)


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        address=args.address, worker_address=args.worker_address, model=args.model, policy=args.policy,
        kv_planner=args.kv_planner or "", max_calls=args.max_calls,
        max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens,
        max_queued=args.max_queued, max_wait_no_worker_s=args.max_wait_no_worker_s,
        predictor_address=args.predictor_address, predictor_timeout_s=args.predictor_timeout_s,
        latency_profile=args.latency_profile, metrics_address=args.metrics_address, job_log=args.job_log,
        state_dir=args.state_dir,
        plans_ahead=args.plans_ahead, prefill_step_ratio=args.prefill_step_ratio, security=security_from_args(args))


async def serve(config: SchedulerConfig) -> int:
    from alise.scheduler.service import start_scheduler

    predict = observe = None
    if config.predictor_address:
        from alise.scheduler.predictor_link import predictor_functions

        predict, observe = predictor_functions(config.predictor_address, config.security)
    server = await start_scheduler(config, predict=predict, observe=observe)
    drained = asyncio.ensure_future(run_until_signal(lambda: server.stop(config.drain_grace_s)))
    failed = asyncio.ensure_future(server.failed.wait())
    await asyncio.wait({drained, failed}, return_when=asyncio.FIRST_COMPLETED)
    if not failed.done():
        failed.cancel()
        return 0
    drained.cancel()
    logger.error("the scheduling loop failed; exiting (see the traceback above)")
    await server.stop(0.5)
    return 1


def listeners(config: SchedulerConfig) -> dict[str, str]:
    return {"--address": config.address, "--worker-address": config.worker_listen_address,
            "--metrics-address": config.metrics_address}


def main(args: argparse.Namespace) -> int:
    return run_service("scheduler", args, config_from_args, serve, listeners)
