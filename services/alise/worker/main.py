"""`alise worker`: run one model replica that dials the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from alise.common.entrypoint import ConfigFlag, add_config_flags, config_values, run_service
from alise.common.security import add_security_arguments, security_from_args
from alise.worker.config import DTYPES, WorkerConfig

logger = logging.getLogger(__name__)


#: The engine's flags under vLLM's names; `alise up` takes the same ones and hands them to
#: every worker.
ENGINE_FLAGS = (
    ConfigFlag("dtype", "weights' and activations' dtype (auto: float32 on the CPU, float16 on a GPU)",
               choices=DTYPES),
    ConfigFlag("seed", "seed of a preset model's random weights (workers with one seed serve one model)"),
    ConfigFlag("gpu_memory_utilization", "share of the GPU's memory the worker may hold, weights, "
               "activations and KV cache together; the KV cache gets what the weights leave of it",
               metavar="FRACTION"),
    ConfigFlag("max_num_seqs", "sequences in one step", metavar="N"),
    ConfigFlag("max_num_batched_tokens", "tokens one step may feed, decodes first, then prompt chunks "
               "(chunked prefill); 0 = 256 or twice --max-num-seqs if more", metavar="N"),
    ConfigFlag("max_model_len", "context limit in tokens, prompt and output (default: the model's)",
               metavar="TOKENS"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--scheduler", default=env("ALISE_SCHEDULER_WORKER_ADDRESS", "127.0.0.1:50052"),
                   dest="scheduler_address",
                   help="the scheduler's worker listener, its --worker-address (env "
                        "ALISE_SCHEDULER_WORKER_ADDRESS; default %(default)s)")
    p.add_argument("--model", default=env("ALISE_MODEL") or None,
                   help="model directory or preset name (env ALISE_MODEL; default: the embedded tiny-llama)")
    p.add_argument("--device", default=env("ALISE_DEVICE", "cpu"),
                   help="cpu, cuda, cuda:1, ... (env ALISE_DEVICE; default %(default)s)")
    add_config_flags(p, WorkerConfig, ENGINE_FLAGS)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-device-blocks", type=int, default=0,
                   help="device KV blocks (default 0: sized from --kv-cache-mib on the CPU, from "
                        "--gpu-memory-utilization on CUDA)")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="CPU KV budget when blocks are not given")
    p.add_argument("--num-host-blocks", type=int, default=0,
                   help="host (CPU) KV blocks for swapped-out jobs; the adaptive planner's host moves need them")
    p.add_argument("--worker-id", default=env("ALISE_WORKER_ID", ""),
                   help="name shown in status and metrics, unique among the scheduler's workers (env "
                        "ALISE_WORKER_ID; default: HOST-DEVICE, e.g. node1-cuda0, the same after a "
                        "restart; two workers on one host and device need their own)")
    p.add_argument("--health-address", default=env("ALISE_WORKER_HEALTH_ADDRESS", "127.0.0.1:0"),
                   help="where to serve grpc.health.v1: SERVING while connected to the scheduler; "
                        "port 0 = any free port, '' = nowhere (env ALISE_WORKER_HEALTH_ADDRESS; "
                        "default %(default)s)")
    p.add_argument("--latency-profile", default=env("ALISE_LATENCY_PROFILE", ""),
                   help="latency profile JSON to load, or to write with --profile-latency "
                        "(env ALISE_LATENCY_PROFILE; default: none)")
    p.add_argument("--profile-latency", action="store_true",
                   help="measure this engine's step times at start-up and fit a latency profile")
    p.add_argument("--step-log", default=env("ALISE_WORKER_STEP_LOG", ""),
                   help="append a JSON line per model step (its shape and seconds) to this file "
                        "(env ALISE_WORKER_STEP_LOG; default: none)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly on CUDA")
    p.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false",
                   help="the plain torch path on CUDA: no fused kernels checked and timed at start-up")
    p.add_argument("--kernel-plan", default=env("ALISE_KERNEL_PLAN", ""),
                   help="file of the start-up kernel plan: reused when made for this device, model and "
                        "sizes, else written (env ALISE_KERNEL_PLAN; default: plan at every start)")
    p.add_argument("--runner", choices=("paged", "transformers"), default=env("ALISE_WORKER_RUNNER", "paged"),
                   help="forward pass: this engine's paged one, or the plain transformers one (a "
                        "baseline) (env ALISE_WORKER_RUNNER; default %(default)s)")
    p.add_argument("--metrics-address", default=env("ALISE_WORKER_METRICS", ""),
                   help="serve Prometheus metrics over HTTP here, port 0 = any free port (env "
                        "ALISE_WORKER_METRICS; default: none)")
    p.add_argument("--orphan-ttl", type=float, default=60.0, dest="orphan_ttl_s",
                   help="seconds to keep jobs, paused with their KV, after losing the scheduler, for a "
                        "restarted one to adopt (default %(default)s)")
    add_security_arguments(p, server=False)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        scheduler_address=args.scheduler_address, model=args.model, device=args.device,
        block_size=args.block_size, num_device_blocks=args.num_device_blocks,
        kv_cache_bytes=args.kv_cache_mib << 20, num_host_blocks=args.num_host_blocks,
        worker_id=args.worker_id, health_address=args.health_address, **config_values(args, ENGINE_FLAGS),
        latency_profile=args.latency_profile, profile_latency=args.profile_latency, cuda_graphs=args.cuda_graphs,
        step_log=args.step_log, orphan_ttl_s=args.orphan_ttl_s, fast_kernels=args.fast_kernels,
        kernel_plan=args.kernel_plan,
        runner=args.runner,
        metrics_address=args.metrics_address, security=security_from_args(args))


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
