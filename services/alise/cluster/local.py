"""`alise up`: the local cluster as real processes on loopback.

The processes run exactly the commands that docker-compose.yml gives its services
(``service_commands``); a cluster test starts the compose file's commands the same way,
so the two cannot drift apart.
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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    #: Where the scheduler listens (clients connect here).
    address: str = "127.0.0.1:50051"
    #: Model directory or preset (None = the embedded default, random weights).
    model: str | None = None
    num_workers: int = 1
    policy: str = "fcfs"
    device: str = "cpu"
    #: Run the length predictor (needed by the alise policy to be any good).
    predictor: bool = True
    predictor_address: str = "127.0.0.1:50053"
    #: Directory for the predictor's index and logs.
    state_dir: str = ".alise"
    #: First worker health port; worker i serves health on base + i.
    worker_health_base_port: int = 50060
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


def service_commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """The ``alise`` sub-commands of each service (without the program name)."""
    model = ["--model", cfg.model] if cfg.model else []
    commands: dict[str, list[str]] = {}
    if cfg.predictor:
        commands["predictor"] = ["predictor", "serve", "--address", cfg.predictor_address,
                                 "--index-dir", os.path.join(cfg.state_dir, "predictor")]
    sched = ["scheduler", "--address", cfg.address, "--policy", cfg.policy, *model]
    if cfg.predictor:
        sched += ["--predictor", cfg.predictor_address]
    commands["scheduler"] = sched + list(cfg.scheduler_args)
    host = cfg.address.rsplit(":", 1)[0]
    for i in range(cfg.num_workers):
        commands[f"worker-{i}"] = [
            "worker", "--scheduler", cfg.address, "--device", cfg.device, *model,
            "--worker-id", f"worker-{i}",
            "--health-address", f"{host}:{cfg.worker_health_base_port + i}",
            *cfg.worker_args]
    if cfg.http_address:
        commands["http"] = ["http", "--scheduler", cfg.address, "--address", cfg.http_address,
                            "--health-address", cfg.http_health_address]
    return commands


def health_address(name: str, command: list[str]) -> str:
    """The address whose grpc.health.v1 says the service is up."""
    flag = "--health-address" if "--health-address" in command else "--address"
    return command[command.index(flag) + 1]


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


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
        """Starts (or restarts) one service with its command; its log is appended to."""
        args = self.commands[name]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", **self.env}
        with open(os.path.join(self.log_dir, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "alise.cli.main", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        logger.info("started %s (pid %d): alise %s", name, proc.pid, " ".join(args))
        return proc

    def wait_healthy(self, timeout_s: float, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {name: self.commands[name] for name in (names or self.commands)}
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}; "
                                       f"see {os.path.join(self.log_dir, name + '.log')}")
                if is_serving(health_address(name, pending[name]), timeout_s=0.5):
                    logger.info("%s is serving", name)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:g} s: {', '.join(pending)}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 30.0) -> dict[str, int]:
        """SIGTERM in reverse start order, SIGKILL what outlives the grace period."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes
