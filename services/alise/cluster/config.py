"""What `alise up` runs: the cluster's settings and each service's command.

The commands are the ones docker-compose.yml gives its services (a cluster test compares
them, another checks the Kubernetes manifests against compose), so the three cannot drift.
Every listener is on ``host`` unless its own address says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from alise.cluster.ports import resolve, split_address
from alise.common.entrypoint import config_argv
from alise.core.choices import POLICY_NAMES
from alise.scheduler.config import SchedulerConfig
from alise.worker.config import WorkerConfig

#: The port of each listener whose address is not given (on ``ClusterConfig.host``).
DEFAULT_PORTS = {"address": 50051, "worker_address": 50052, "predictor_address": 50053,
                 "http_address": 8000, "http_health_address": 8001}


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial_address(address: str) -> str:
    """Where a process of this host reaches a listener on ``address``: a wildcard listener
    (every interface) through loopback."""
    host, port = split_address(address)
    return join_host_port({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


@dataclass(frozen=True)
class ClusterConfig:
    #: Host of every listener not given an address of its own: 127.0.0.1 (this machine only),
    #: 0.0.0.0 (every interface, as in a container), an interface's address.
    host: str = "127.0.0.1"
    #: Where the scheduler listens for clients (None = host:50051; port 0 = any free one).
    address: str | None = None
    #: Where the scheduler listens for workers, which dial it (None = host:50052).
    worker_address: str | None = None
    #: Where the predictor listens (None = host:50053).
    predictor_address: str | None = None
    #: Where the OpenAI-compatible HTTP door listens (None = host:8000; "" = no door).
    http_address: str | None = None
    #: The door's grpc.health.v1 listener, which says it is up (None = host:8001).
    http_health_address: str | None = None
    #: Model directory or preset (None = the embedded default, random weights).
    model: str | None = None
    num_workers: int = 1
    #: Scheduling policy: alise (the product: shortest predicted remaining time), fcfs, oracle.
    policy: str = SchedulerConfig.policy
    device: str = "cpu"
    #: Run the length predictor (the alise policy's estimates come from it).
    predictor: bool = True
    #: Directory for the predictor's index, the services' logs and the cluster file.
    state_dir: str = ".alise"
    #: First worker health port; worker i serves grpc.health.v1 on base + i (0 = any free port).
    worker_health_base_port: int = 50060
    #: Prometheus metrics: the scheduler on base, the predictor on base + 1, worker i on
    #: base + 2 + i (0 = any free ports; None = no metrics).
    metrics_base_port: int | None = None
    #: The workers' engine settings under vLLM's names (alise.worker.main.ENGINE_FLAGS; its
    #: other fields are not used): every worker gets those that differ from the defaults, and
    #: the scheduler the context limit.
    engine: WorkerConfig = field(default_factory=WorkerConfig)
    #: The model name the HTTP door answers to and lists (None = the scheduler's model).
    served_model_name: str | None = None
    #: Extra arguments for every worker (e.g. ["--num-device-blocks", "64"]).
    worker_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        if self.http_address != "" and self.http_health_address == "":
            raise ValueError("http_health_address must be given when the HTTP door runs: it says the door is up")
        for name in DEFAULT_PORTS:
            address = self.listen_address(name)
            if address and split_address(address)[1] > 65535:
                raise ValueError(f"{name} has port {split_address(address)[1]}, past 65535")
        for name, base, count in (("worker_health_base_port", self.worker_health_base_port, self.num_workers),
                                  ("metrics_base_port", self.metrics_base_port, self.num_workers + 2)):
            if base is not None and not (base == 0 or 0 < base and base + count - 1 <= 65535):
                raise ValueError(f"{name} must be 0 or a port with room for {count} after it, got {base}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.served_model_name is not None:
            from alise.http.config import HttpConfig

            HttpConfig(served_model_name=self.served_model_name)  # the door's own check of the name

    def listen_address(self, name: str) -> str:
        """The address of listener ``name`` (a key of DEFAULT_PORTS): its own, or on ``host``;
        "" for a door that does not run."""
        given = getattr(self, name)
        if given is None:
            return join_host_port(self.host, DEFAULT_PORTS[name])
        return given


def _port(base: int, offset: int, host: str) -> str:
    return resolve(join_host_port(host, base + offset if base else 0))


def service_commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """The ``alise`` sub-commands of each service (without the program name). Ports given
    as 0 are resolved to free ones here, so every command names real ports."""
    from alise.scheduler.main import ENGINE_FLAGS as SCHEDULER_FLAGS
    from alise.worker.main import ENGINE_FLAGS as WORKER_FLAGS

    model = ["--model", cfg.model] if cfg.model else []
    address = resolve(cfg.listen_address("address"))
    predictor_address = resolve(cfg.listen_address("predictor_address"))
    worker_address = resolve(cfg.listen_address("worker_address"))

    def metrics(offset: int) -> list[str]:
        if cfg.metrics_base_port is None:
            return []
        return ["--metrics-address", _port(cfg.metrics_base_port, offset, cfg.host)]

    commands: dict[str, list[str]] = {}
    if cfg.predictor:
        commands["predictor"] = ["predictor", "serve", "--address", predictor_address,
                                 "--index-dir", os.path.join(cfg.state_dir, "predictor"), *metrics(1)]
    sched = ["scheduler", "--address", address, "--worker-address", worker_address, "--policy", cfg.policy,
             "--state-dir", os.path.join(cfg.state_dir, "scheduler"), *model]
    if cfg.predictor:
        sched += ["--predictor", dial_address(predictor_address)]
    sched += config_argv(SchedulerConfig(max_model_len=cfg.engine.max_model_len), SCHEDULER_FLAGS)
    commands["scheduler"] = sched + metrics(0) + list(cfg.scheduler_args)
    for i in range(cfg.num_workers):
        commands[f"worker-{i}"] = [
            "worker", "--scheduler", dial_address(worker_address), "--device", cfg.device, *model,
            "--worker-id", f"worker-{i}",
            "--health-address", _port(cfg.worker_health_base_port, i, cfg.host), *metrics(2 + i),
            *config_argv(cfg.engine, WORKER_FLAGS), *cfg.worker_args]
    if cfg.http_address != "":
        commands["http"] = ["http", "--scheduler", dial_address(address), "--address", resolve(cfg.listen_address("http_address")),
                            "--health-address", resolve(cfg.listen_address("http_health_address"))]
        if cfg.served_model_name is not None:
            commands["http"] += ["--served-model-name", cfg.served_model_name]
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
    """The address whose grpc.health.v1 says the service is up and alive (a worker's and the
    HTTP door's health listener, the others' gRPC port)."""
    listen = listen_addresses(command)
    return dial_address(listen.get("health") or listen["grpc"])
