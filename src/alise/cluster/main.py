"""`alise up`: start the local cluster and supervise it in the foreground until Ctrl-C.

Exit status: 0 after a requested stop (SIGINT, SIGTERM) in which every service drained;
1 when the cluster could not start (a port taken, a service failing before it served);
2 on bad flags or a state directory it cannot write. Once up, the cluster stays up: a
service that dies, hangs or keeps crashing is restarted (alise.cluster.supervisor).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import signal
import sys
import tempfile

from alise.cluster.config import CLUSTER_SET, ClusterConfig, join_host_port, listen_addresses, service_commands
from alise.cluster.local import LocalCluster, ServiceExited
from alise.cluster.logfiles import LogLimits
from alise.cluster.supervisor import RestartPolicy, Supervisor
from alise.common.entrypoint import ConfigFlag, add_config_flags, build_config, config_flags, config_values
from alise.common.logs import configure_logging
from alise.common.ports import PortTaken, check_free, split_address
from alise.http.config import HttpConfig
from alise.http.main import flags as http_flags
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.main import FLAGS as SCHEDULER_FLAGS
from alise.scheduler.main import is_scheduling
from alise.worker.config import WorkerConfig
from alise.worker.main import FLAGS as WORKER_FLAGS

logger = logging.getLogger(__name__)

#: The state file in --state-dir that `alise status` reads.
STATE_FILE = "cluster.json"

#: The services' flags that `alise up` takes, each as the service takes it, and hands on to
#: it where given (the cluster decides the others: ``alise.cluster.config.CLUSTER_SET``).
UP_WORKER_FLAGS = tuple(f for f in WORKER_FLAGS if f.field not in CLUSTER_SET["worker"])
UP_SCHEDULER_FLAGS = tuple(f for f in SCHEDULER_FLAGS
                           if f.field.split(".")[0] not in CLUSTER_SET["scheduler"])
UP_HTTP_FLAGS = tuple(f for f in http_flags() if f.field in ("served_model_name", "request_timeout_s",
                                                              "max_body_bytes", "max_connections"))
#: The supervisor's own settings.
RESTART_FLAGS = config_flags(RestartPolicy, ConfigFlag("startup_timeout_s", name="timeout", metavar="S"),
                             ConfigFlag("hang_timeout_s", name="hang-timeout", metavar="S"),
                             ConfigFlag("crash_loop_after", metavar="N"))
LOG_FLAGS = config_flags(LogLimits, ConfigFlag("max_mb", name="log-max-mb", metavar="MB"),
                         ConfigFlag("backups", name="log-backups", metavar="N"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    engine = p.add_argument_group("model and workers (vLLM's flag names; every worker gets them)")
    engine.add_argument("--model", default=os.environ.get("ALISE_MODEL") or None,
                        help="model directory or preset name (env ALISE_MODEL; default: the embedded "
                             "tiny-llama with random weights)")
    engine.add_argument("--workers", type=int, default=ClusterConfig.num_workers, dest="num_workers", metavar="N",
                        help="worker processes (default: %(default)s)")
    add_config_flags(engine, WorkerConfig, UP_WORKER_FLAGS, passed_to="the workers'")
    _add_listener_arguments(p.add_argument_group("listeners (port 0 = any free port)"))
    sched = p.add_argument_group("scheduling (the same flags as `alise scheduler` and `alise sim`)")
    add_config_flags(sched, SchedulerConfig, [f for f in UP_SCHEDULER_FLAGS if is_scheduling(f)],
                     passed_to="the scheduler's")
    sched.add_argument("--no-predictor", action="store_false", dest="predictor",
                       help="run without the length predictor (estimates fall back to running means)")
    add_config_flags(p.add_argument_group("scheduler (`alise scheduler`'s flags)"), SchedulerConfig,
                     [f for f in UP_SCHEDULER_FLAGS if not is_scheduling(f)], passed_to="the scheduler's")
    add_config_flags(p.add_argument_group("HTTP door (`alise http`'s flags)"), HttpConfig, UP_HTTP_FLAGS,
                     passed_to="the HTTP door's")
    _add_supervision_arguments(p.add_argument_group("supervision and logs"))


def _add_listener_arguments(g) -> None:
    g.add_argument("--host", default=ClusterConfig.host,
                   help="where every service listens unless its own flag says otherwise (0.0.0.0: "
                        "every interface, as in a container)")
    g.add_argument("--address", default=None,
                   help="the scheduler's HOST:PORT, where clients connect (default: --host, port 50051)")
    g.add_argument("--worker-address", default=None,
                   help="the scheduler's HOST:PORT for workers; they dial it with a secret that `alise "
                        "up` makes for the cluster unless ALISE_INTERNAL_SECRET is set (default: "
                        "--host, port 50052)")
    g.add_argument("--predictor-address", default=None, help="the predictor's HOST:PORT (default: --host, port 50053)")
    g.add_argument("--http-address", default=None,
                   help="the OpenAI-compatible HTTP door's HOST:PORT ('' = no door; default: --host, port 8000)")
    g.add_argument("--port", type=int, default=None, metavar="PORT",
                   help="the HTTP door's port on --host (vLLM's --port; default: --http-address's, 8000)")
    g.add_argument("--http-health-address", default=None,
                   help="where the HTTP door serves grpc.health.v1 (default: --host, port 8001)")
    g.add_argument("--worker-health-port", type=int, default=ClusterConfig.worker_health_base_port,
                   dest="worker_health_base_port", metavar="PORT",
                   help="worker i serves grpc.health.v1 on this port + i, on --host")
    g.add_argument("--metrics-port", type=int, default=None, dest="metrics_base_port", metavar="PORT",
                   help="serve Prometheus metrics on --host: the scheduler on this port, the predictor "
                        "on +1, worker i on +2+i (default: no metrics)")


def _add_supervision_arguments(g) -> None:
    g.add_argument("--state-dir", default=ClusterConfig.state_dir,
                   help="the predictor's index, the services' logs and the cluster file that "
                        "`alise status` reads (default: %(default)s)")
    add_config_flags(g, RestartPolicy, RESTART_FLAGS)
    add_config_flags(g, LogLimits, LOG_FLAGS)


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


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    http_address = args.http_address
    if args.port is not None:
        if http_address is not None:
            raise ValueError("give the HTTP door --port or --http-address, not both")
        http_address = join_host_port(args.host, args.port)
    return ClusterConfig(
        host=args.host, address=args.address, worker_address=args.worker_address,
        predictor_address=args.predictor_address, http_address=http_address,
        http_health_address=args.http_health_address, model=args.model, num_workers=args.num_workers,
        predictor=args.predictor, state_dir=args.state_dir,
        worker_health_base_port=args.worker_health_base_port, metrics_base_port=args.metrics_base_port,
        scheduler=build_config(SchedulerConfig, config_values(args, UP_SCHEDULER_FLAGS)),
        worker=build_config(WorkerConfig, config_values(args, UP_WORKER_FLAGS)),
        http=build_config(HttpConfig, config_values(args, UP_HTTP_FLAGS)))


def state_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot hold the cluster's state (None: it can). A full disk is no reason:
    the cluster runs on it, dropping the log lines it cannot write."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--state-dir {path} is not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return None
        return f"cannot use --state-dir {path}: {exc.strerror or exc}"
    return None


def say(message: str) -> None:
    """A line on the terminal; one that cannot be written (stderr on a full disk) is dropped."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def main(args: argparse.Namespace) -> int:
    configure_logging("up")
    try:
        cfg = config_from_args(args)
        policy = build_config(RestartPolicy, config_values(args, RESTART_FLAGS))
        limits = build_config(LogLimits, config_values(args, LOG_FLAGS))
        commands = service_commands(cfg)
        check_ports(commands)
    except (ValueError, PortTaken) as exc:
        say(f"alise up: {exc}")
        return 2 if isinstance(exc, ValueError) else 1
    problem = state_dir_problem(cfg.state_dir)
    if problem is not None:
        say(f"alise up: {problem}")
        return 2
    if cfg.model is None:
        say("alise: no --model given: serving the embedded default, tiny-llama with RANDOM weights on the "
            "CPU (its text is meaningless; the serving path is the real one)")
    cluster = LocalCluster(commands, log_dir=os.path.join(cfg.state_dir, "logs"), env=cluster_secret(),
                           log_limits=limits)
    address = listen_addresses(commands["scheduler"])["grpc"]
    info = {"address": address, "policy": cfg.policy, "log_dir": cluster.log_dir, "model": cfg.model,
            "served_model_name": cfg.http.served_model_name, "log_rotation": limits.describe()}
    supervisor = Supervisor(cluster, policy=policy, state_file=os.path.join(cfg.state_dir, STATE_FILE), info=info)
    return _run(supervisor, cfg, address, policy.startup_timeout_s)


def cluster_secret() -> dict[str, str]:
    """The environment that gives every service one internal secret, made for this cluster,
    so no process without it can register as a worker; none when one is given already."""
    if os.environ.get("ALISE_INTERNAL_SECRET"):
        return {}
    return {"ALISE_INTERNAL_SECRET": secrets.token_hex(32)}


class _StopRequested(Exception):
    pass


def _ready_line(cluster: LocalCluster, cfg: ClusterConfig, address: str) -> str:
    listen = {name: listen_addresses(command) for name, command in cluster.commands.items()}
    predictor = f", predictor {listen['predictor']['grpc']}" if cfg.predictor else ", no predictor"
    door = f", HTTP door {listen['http']['grpc']}" if "http" in listen else ""
    workers = f"{cfg.num_workers} worker{'' if cfg.num_workers == 1 else 's'}"
    return (f"alise: cluster ready on {address} ({workers} dialing {listen['scheduler']['workers']}, policy "
            f"{cfg.policy}{predictor}{door}); logs in {cluster.log_dir} (NAME.log, "
            f"{cluster.log_limits.describe()}); `alise status` lists every service. Ctrl-C to stop.")


def _run(supervisor: Supervisor, cfg: ClusterConfig, address: str, startup_timeout_s: float) -> int:
    cluster = supervisor.cluster
    stop = {"requested": False, "started": False}

    def request_stop(signum, frame):
        stop["requested"] = True
        if not stop["started"]:
            raise _StopRequested

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        supervisor.start(startup_timeout_s)
        stop["started"] = True
        say(_ready_line(cluster, cfg, address))
        supervisor.run(lambda: stop["requested"])
    except _StopRequested:
        logger.info("stop requested during start-up")
    except (ServiceExited, TimeoutError) as exc:
        logger.error("%s", exc)
        cluster.stop()
        supervisor.remove_state()
        return 1
    running = [name for name, proc in cluster.procs.items() if proc.poll() is None]
    codes = cluster.stop()
    supervisor.remove_state()
    say(f"alise: stopped ({', '.join(f'{n}={c}' for n, c in codes.items())})")
    return 0 if all(codes[name] == 0 for name in running) else 1
