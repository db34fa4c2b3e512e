"""`alise up`: start the local cluster and stay in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from alise.cluster.local import ClusterConfig, LocalCluster, service_commands
from alise.common.logs import configure_logging

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("ALISE_MODEL") or None,
                   help="model directory or preset name (default: tiny-llama with random weights)")
    p.add_argument("--workers", type=int, default=1, dest="num_workers")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "alise", "oracle"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--no-predictor", action="store_false", dest="predictor")
    p.add_argument("--state-dir", default=".alise")
    p.add_argument("--worker-arg", action="append", default=[], dest="worker_args",
                   help="extra argument passed to every worker (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, dest="startup_timeout_s")


def main(args: argparse.Namespace) -> int:
    configure_logging("up")
    cfg = ClusterConfig(address=args.address, model=args.model, num_workers=args.num_workers,
                        policy=args.policy, device=args.device, predictor=args.predictor,
                        state_dir=args.state_dir, worker_args=tuple(args.worker_args),
                        startup_timeout_s=args.startup_timeout_s)
    if cfg.model is None:
        print("alise: no --model given: serving the embedded default, tiny-llama with RANDOM "
              "weights on the CPU (its text is meaningless; the serving path is the real one)",
              file=sys.stderr)
    cluster = LocalCluster(service_commands(cfg), log_dir=os.path.join(cfg.state_dir, "logs"))
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        cluster.start(cfg.startup_timeout_s)
        cluster.wait_healthy(cfg.startup_timeout_s)
        print(f"alise: cluster ready on {cfg.address} ({cfg.num_workers} worker(s), policy "
              f"{cfg.policy}); logs in {cluster.log_dir}. Ctrl-C to stop.", file=sys.stderr,
              flush=True)
        while not stop_requested:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    logger.error("%s exited with code %s", name, proc.returncode)
                    stop_requested = True
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s", exc)
        cluster.stop()
        return 1
    codes = cluster.stop()
    print(f"alise: stopped ({', '.join(f'{n}={c}' for n, c in codes.items())})", file=sys.stderr)
    return 0
