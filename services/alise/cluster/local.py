"""The local cluster: its services' commands and the processes that run them.

The processes run exactly the commands that docker-compose.yml gives its services
(``service_commands``); a cluster test starts the compose file's commands the same way,
and another checks the Kubernetes manifests against compose, so the three cannot drift.
Each process runs under ``alise.cluster.child``, which makes it die with its parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.cluster.child import SUPERVISOR_PID_ENV
from alise.cluster.ports import owns_listener, resolve, split_address
from alise.core.choices import POLICY_NAMES
from alise.scheduler.config import SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    #: Where the scheduler listens for clients; port 0 = any free one.
    address: str = "127.0.0.1:50051"
    #: Where the scheduler listens for workers (they dial it); port 0 = any free one.
    worker_address: str = "127.0.0.1:50052"
    #: Model directory or preset (None = the embedded default, random weights).
    model: str | None = None
    num_workers: int = 1
    #: Scheduling policy: alise (the product: shortest predicted remaining time), fcfs, oracle.
    policy: str = SchedulerConfig.policy
    device: str = "cpu"
    #: Run the length predictor (the alise policy's estimates come from it).
    predictor: bool = True
    #: Where the predictor listens; port 0 = any free one.
    predictor_address: str = "127.0.0.1:50053"
    #: Directory for the predictor's index and the services' logs.
    state_dir: str = ".alise"
    #: First worker health port; worker i serves grpc.health.v1 on base + i (0 = any free port).
    worker_health_base_port: int = 50060
    #: Prometheus metrics: the scheduler on base, the predictor on base + 1, worker i on
    #: base + 2 + i (0 = any free ports; None = no metrics).
    metrics_base_port: int | None = None
    #: Extra arguments for every worker (e.g. ["--num-device-blocks", "64"]).
    worker_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    #: Where the OpenAI-compatible HTTP door listens ("" = no door).
    http_address: str = "127.0.0.1:8000"
    #: The door's grpc.health.v1 address (what says it is up).
    http_health_address: str = "127.0.0.1:8001"

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        for name in ("address", "worker_address", "predictor_address"):
            _, port = split_address(getattr(self, name))
            if port > 65535:
                raise ValueError(f"{name} has port {port}, past 65535")
        for name, base, count in (("worker_health_base_port", self.worker_health_base_port, self.num_workers),
                                  ("metrics_base_port", self.metrics_base_port, self.num_workers + 2)):
            if base is not None and not (base == 0 or 0 < base and base + count - 1 <= 65535):
                raise ValueError(f"{name} must be 0 or a port with room for {count} after it, got {base}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")


def _port(base: int, offset: int, host: str) -> str:
    return resolve(f"{host}:{base + offset if base else 0}")


def service_commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """The ``alise`` sub-commands of each service (without the program name). Ports given
    as 0 are resolved to free ones here, so every command names real ports."""
    model = ["--model", cfg.model] if cfg.model else []
    host = split_address(cfg.address)[0]
    address, predictor_address = resolve(cfg.address), resolve(cfg.predictor_address)
    worker_address = resolve(cfg.worker_address)

    def metrics(offset: int) -> list[str]:
        if cfg.metrics_base_port is None:
            return []
        return ["--metrics-address", _port(cfg.metrics_base_port, offset, host)]

    commands: dict[str, list[str]] = {}
    if cfg.predictor:
        commands["predictor"] = ["predictor", "serve", "--address", predictor_address,
                                 "--index-dir", os.path.join(cfg.state_dir, "predictor"), *metrics(1)]
    sched = ["scheduler", "--address", address, "--worker-address", worker_address, "--policy", cfg.policy,
             *model]
    if cfg.predictor:
        sched += ["--predictor", predictor_address]
    commands["scheduler"] = sched + metrics(0) + list(cfg.scheduler_args)
    for i in range(cfg.num_workers):
        commands[f"worker-{i}"] = [
            "worker", "--scheduler", worker_address, "--device", cfg.device, *model,
            "--worker-id", f"worker-{i}",
            "--health-address", _port(cfg.worker_health_base_port, i, host), *metrics(2 + i),
            *cfg.worker_args]
    if cfg.http_address:
        commands["http"] = ["http", "--scheduler", address, "--address", resolve(cfg.http_address),
                            "--health-address", resolve(cfg.http_health_address)]
    return commands


#: Flags by which a service's command says where it listens, and what listens there.
_LISTEN_FLAGS = {"--address": "grpc", "--worker-address": "workers", "--health-address": "health",
                 "--metrics-address": "metrics"}


def listen_addresses(command: list[str]) -> dict[str, str]:
    """What the service listens on, by kind (grpc, workers, health, metrics), read from its
    command."""
    found = {}
    for flag, kind in _LISTEN_FLAGS.items():
        if flag in command and command.index(flag) + 1 < len(command):
            found[kind] = command[command.index(flag) + 1]
    return found


def health_address(name: str, command: list[str]) -> str:
    """The address whose grpc.health.v1 says the service is up (a worker's health port, the
    others' gRPC port)."""
    listen = listen_addresses(command)
    return listen.get("health") or listen["grpc"]


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class ServiceExited(RuntimeError):
    """A service ended while the cluster waited for it; the message ends with its log's tail."""


@dataclass
class LocalCluster:
    commands: dict[str, list[str]]
    log_dir: str
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, tier_timeout_s: float = 300.0) -> None:
        """Starts the predictor, waits until it serves, then the scheduler likewise, then the
        workers: each tier dials the one before, so it never starts against a closed port."""
        os.makedirs(self.log_dir, exist_ok=True)
        for name in self.commands:
            self.start_one(name)
            if name in ("predictor", "scheduler"):
                self.wait_healthy(tier_timeout_s, names=[name])

    def start_one(self, name: str) -> subprocess.Popen:
        """Starts (or restarts) one service with its command; its log is appended to.

        NOTE: the child's parent-death signal fires when the *thread* that started it ends,
        so services are started from one long-lived thread (the supervisor's main thread).
        """
        args = self.commands[name]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", SUPERVISOR_PID_ENV: str(os.getpid()), **self.env}
        os.makedirs(self.log_dir, exist_ok=True)
        with open(self.log_path(name), "ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches `alise up` only, which then
            # drains the services in order.
            proc = subprocess.Popen([sys.executable, "-m", "alise.cluster.child", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        logger.info("started %s (pid %d): alise %s", name, proc.pid, " ".join(args))
        return proc

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def log_tail(self, name: str, num_lines: int = 15) -> str:
        try:
            with open(self.log_path(name), "rb") as f:
                f.seek(max(os.path.getsize(self.log_path(name)) - 16384, 0))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-num_lines:])

    def is_up(self, name: str, timeout_s: float = 0.5) -> bool:
        """Running, SERVING on its health address, and the listener there is its own."""
        proc = self.procs[name]
        address = health_address(name, self.commands[name])
        if proc.poll() is not None or not is_serving(address, timeout_s):
            return False
        return owns_listener(proc.pid, split_address(address)[1]) is not False

    def wait_healthy(self, timeout_s: float, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.commands if names is None else names)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise ServiceExited(f"{name} exited with code {proc.returncode} before it served; "
                                        f"the end of {self.log_path(name)}:\n{self.log_tail(name)}")
                if self.is_up(name):
                    logger.info("%s is serving", name)
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:g} s: {', '.join(pending)}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 30.0) -> dict[str, int]:
        """Drains the scheduler first, while the workers still run its requests, then the
        rest in reverse start order; SIGKILL for what outlives the grace period. Returns each
        process's exit code (a service that had already died keeps its own)."""
        first = [n for n in self.procs if n == "scheduler"]
        rest = [n for n in reversed(list(self.procs)) if n != "scheduler"]
        codes: dict[str, int] = {}
        for names in (first, rest):
            for name in names:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for name in names:
                proc = self.procs[name]
                try:
                    codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not drain within %g s; killing it", name, grace_s)
                    proc.kill()
                    codes[name] = proc.wait()
        return {name: codes[name] for name in self.procs}
