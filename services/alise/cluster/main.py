"""`alise up`: start the local cluster and supervise it in the foreground until Ctrl-C.

Exit status: 0 after a requested stop (SIGINT, SIGTERM) in which every service drained;
1 when the cluster could not start (a port taken, a service failing before it served) or
stopped on its own (the scheduler died, a service in a crash loop); 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys

from alise.cluster.local import ClusterConfig, LocalCluster, ServiceExited, listen_addresses, service_commands
from alise.cluster.ports import PortTaken, check_free, split_address
from alise.cluster.supervisor import ClusterFailed, RestartPolicy, Supervisor
from alise.common.logs import configure_logging
from alise.core.choices import POLICY_NAMES

logger = logging.getLogger(__name__)

#: The state file in --state-dir that `alise status` reads.
STATE_FILE = "cluster.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("ALISE_MODEL") or None,
                   help="model directory or preset name (env ALISE_MODEL; default: the embedded "
                        "tiny-llama with random weights)")
    p.add_argument("--workers", type=int, default=1, dest="num_workers", metavar="N",
                   help="worker processes")
    p.add_argument("--policy", default=ClusterConfig.policy, choices=POLICY_NAMES,
                   help="scheduling policy: alise (shortest predicted remaining time), fcfs "
                        "(arrival order, vLLM's), oracle (true lengths, for benchmarks)")
    p.add_argument("--device", default="cpu", help="device of every worker (cpu, cuda, cuda:1, ...)")
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="the scheduler's HOST:PORT, where clients connect; the other services "
                        "listen on its host too (port 0 = any free port)")
    p.add_argument("--worker-address", default=ClusterConfig.worker_address,
                   help="the scheduler's HOST:PORT for workers; they dial it with a secret that `alise "
                        "up` makes for the cluster unless ALISE_INTERNAL_SECRET is set (port 0 = any "
                        "free port)")
    p.add_argument("--predictor-address", default="127.0.0.1:50053",
                   help="the predictor's HOST:PORT (port 0 = any free port)")
    p.add_argument("--no-predictor", action="store_false", dest="predictor",
                   help="run without the length predictor (estimates fall back to running means)")
    p.add_argument("--http-address", default=ClusterConfig.http_address,
                   help="the OpenAI-compatible HTTP door's HOST:PORT (port 0 = any free port; '' = no "
                        "door; default %(default)s)")
    p.add_argument("--http-health-address", default=ClusterConfig.http_health_address,
                   help="where the HTTP door serves grpc.health.v1 (default %(default)s)")
    p.add_argument("--worker-health-port", type=int, default=50060, dest="worker_health_base_port", metavar="PORT",
                   help="worker i serves grpc.health.v1 on this port + i (0 = any free ports)")
    p.add_argument("--metrics-port", type=int, default=None, dest="metrics_base_port", metavar="PORT",
                   help="serve Prometheus metrics: the scheduler on this port, the predictor on +1, "
                        "worker i on +2+i (0 = any free ports; default: no metrics)")
    p.add_argument("--state-dir", default=".alise",
                   help="the predictor's index, the services' logs and the cluster file that "
                        "`alise status` reads")
    p.add_argument("--worker-arg", action="append", default=[], dest="worker_args", metavar="ARG",
                   help="extra argument for every worker, repeatable (e.g. --worker-arg=--kv-cache-mib "
                        "--worker-arg=64)")
    p.add_argument("--scheduler-arg", action="append", default=[], dest="scheduler_args", metavar="ARG",
                   help="extra argument for the scheduler, repeatable (e.g. --scheduler-arg=--kv-planner "
                        "--scheduler-arg=drop)")
    p.add_argument("--timeout", type=float, default=300.0, dest="startup_timeout_s", metavar="SECONDS",
                   help="seconds each start-up tier may take before `alise up` gives up")
    p.add_argument("--max-restarts", type=int, metavar="N", default=RestartPolicy.max_consecutive_failures,
                   help="a service that dies this many times in a row, each within "
                        f"{RestartPolicy.stable_s:g} s of starting, stops the cluster (a crash loop)")


def _port_owner(name: str, kind: str) -> str:
    """What a port is for, and the flag that sets it."""
    if kind == "metrics":
        return f"{name}'s metrics (--metrics-port)"
    if name == "http":
        return "the HTTP door (--http-address)" if kind == "grpc" else "the HTTP door's health (--http-health-address)"
    if kind == "health":
        return f"{name}'s health (--worker-health-port)"
    if kind == "workers":
        return f"the {name}'s worker listener (--worker-address)"
    return f"the {name} (--{'predictor-' if name == 'predictor' else ''}address)"


def check_ports(commands: dict[str, list[str]]) -> None:
    """Raises PortTaken (or ValueError for a port given twice) before anything starts."""
    seen: dict[int, str] = {}
    for name, command in commands.items():
        for kind, address in listen_addresses(command).items():
            what = _port_owner(name, kind)
            port = split_address(address)[1]
            if port in seen:
                raise ValueError(f"port {port} is given to both {seen[port]} and {what}")
            seen[port] = what
            check_free(address, what)


def main(args: argparse.Namespace) -> int:
    configure_logging("up")
    try:
        cfg = ClusterConfig(address=args.address, worker_address=args.worker_address, model=args.model,
                            num_workers=args.num_workers,
                            policy=args.policy, device=args.device, predictor=args.predictor,
                            predictor_address=args.predictor_address, state_dir=args.state_dir,
                            http_address=args.http_address, http_health_address=args.http_health_address,
                            worker_health_base_port=args.worker_health_base_port,
                            metrics_base_port=args.metrics_base_port, worker_args=tuple(args.worker_args),
                            scheduler_args=tuple(args.scheduler_args), startup_timeout_s=args.startup_timeout_s)
        policy = RestartPolicy(max_consecutive_failures=args.max_restarts)
        commands = service_commands(cfg)
        check_ports(commands)
    except (ValueError, PortTaken) as exc:
        print(f"alise up: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    if cfg.model is None:
        print("alise: no --model given: serving the embedded default, tiny-llama with RANDOM "
              "weights on the CPU (its text is meaningless; the serving path is the real one)",
              file=sys.stderr)
    os.makedirs(cfg.state_dir, exist_ok=True)
    cluster = LocalCluster(commands, log_dir=os.path.join(cfg.state_dir, "logs"), env=cluster_secret(cfg))
    address = listen_addresses(commands["scheduler"])["grpc"]
    supervisor = Supervisor(cluster, policy=policy, state_file=os.path.join(cfg.state_dir, STATE_FILE),
                            info={"address": address, "policy": cfg.policy, "log_dir": cluster.log_dir})
    return _run(supervisor, cfg, address)


def cluster_secret(cfg: ClusterConfig) -> dict[str, str]:
    """The environment that gives every service one internal secret, made for this cluster,
    so no process without it can register as a worker; none when one is given already."""
    given = any(a.startswith("--internal-secret-file") for a in (*cfg.scheduler_args, *cfg.worker_args))
    if given or os.environ.get("ALISE_INTERNAL_SECRET"):
        return {}
    return {"ALISE_INTERNAL_SECRET": secrets.token_hex(32)}


class _StopRequested(Exception):
    pass


def _run(supervisor: Supervisor, cfg: ClusterConfig, address: str) -> int:
    cluster = supervisor.cluster
    stop = {"requested": False, "started": False}

    def request_stop(signum, frame):
        stop["requested"] = True
        if not stop["started"]:
            raise _StopRequested

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        supervisor.start(cfg.startup_timeout_s)
        stop["started"] = True
        listen = {name: listen_addresses(command) for name, command in cluster.commands.items()}
        predictor = f", predictor {listen['predictor']['grpc']}" if cfg.predictor else ", no predictor"
        workers = f"{cfg.num_workers} worker{'' if cfg.num_workers == 1 else 's'}"
        print(f"alise: cluster ready on {address} ({workers} dialing {listen['scheduler']['workers']}, policy "
              f"{cfg.policy}{predictor}); logs in {cluster.log_dir}; `alise status` lists every service. "
              f"Ctrl-C to stop.", file=sys.stderr, flush=True)
        supervisor.run(lambda: stop["requested"])
    except _StopRequested:
        logger.info("stop requested during start-up")
    except (ServiceExited, TimeoutError, ClusterFailed) as exc:
        logger.error("%s", exc)
        cluster.stop()
        supervisor.remove_state()
        return 1
    running = [name for name, proc in cluster.procs.items() if proc.poll() is None]
    codes = cluster.stop()
    supervisor.remove_state()
    print(f"alise: stopped ({', '.join(f'{n}={c}' for n, c in codes.items())})", file=sys.stderr)
    return 0 if all(codes[name] == 0 for name in running) else 1
