"""What `alise up` runs: the cluster's settings and each service's command.

`alise up` holds each service's config (``ClusterConfig.scheduler``, ``worker``, ``http``: what
its flags set), fills in what the cluster decides (listeners, model, the predictor, state and
metrics), and hands each child its config as the flags that give it
(``alise.common.entrypoint.config_argv``, the child's own flags): a command line is what crosses
the process boundary, it reads in `ps` and `alise status`, and docker-compose.yml and k8s/ run
the same commands (a cluster test compares them, another checks the Kubernetes manifests
against compose), so the three cannot drift. Every listener is on ``host`` unless its own
address says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from alise.common.entrypoint import config_argv
from alise.common.ports import resolve, split_address
from alise.common.security import SecurityConfig
from alise.http.config import HttpConfig
from alise.scheduler.config import SchedulerConfig
from alise.worker.config import WorkerConfig

#: The port of each listener whose address is not given (on ``ClusterConfig.host``).
DEFAULT_PORTS = {"address": 50051, "worker_address": 50052, "predictor_address": 50053,
                 "http_address": 8000, "http_health_address": 8001}

#: Fields of each service's config that the cluster sets (its flags on `alise up` are the
#: cluster's own): the rest are `alise up`'s flags for that service.
CLUSTER_SET = {
    "scheduler": ("address", "worker_address", "model", "state_dir", "predictor_address", "max_model_len",
                  "metrics_address", "security",
                  # the workers carry the profile; the scheduler adopts the first worker's
                  "latency_profile"),
    "worker": ("scheduler_address", "model", "worker_id", "health_address", "metrics_address", "security"),
}

#: Fields always on a command, whatever their value: the listeners (the port check and `alise
#: status` read them from the commands), the policy and the device (compose's variables).
ALWAYS = {
    "scheduler": ("address", "worker_address", "scheduling.policy"),
    "worker": ("scheduler_address", "device", "health_address"),
    "predictor": ("address",),
    "http": ("address", "scheduler_address", "health_address"),
}

#: The credential of the configs built here: every child reads the cluster's internal secret
#: from the environment the cluster gives it (``alise.cluster.main.cluster_secret``), never
#: from a flag, so a config built here holds this stand-in, which no flag hands on.
FROM_ENVIRONMENT = SecurityConfig(internal_secret="the cluster's, from the environment")


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
    #: Run the length predictor (the alise policy's estimates come from it).
    predictor: bool = True
    #: Directory for the predictor's index, the services' logs and the cluster file.
    state_dir: str = ".alise"
    #: First worker health port; worker i serves grpc.health.v1 on base + i (0 = any free port).
    worker_health_base_port: int = 50060
    #: Prometheus metrics: the scheduler on base, the predictor on base + 1, worker i on
    #: base + 2 + i (0 = any free ports; None = no metrics).
    metrics_base_port: int | None = None
    #: The scheduler's settings; the cluster sets those in ``CLUSTER_SET["scheduler"]`` (the
    #: context limit is the workers').
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: Every worker's settings; the cluster sets those in ``CLUSTER_SET["worker"]``.
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    #: The HTTP door's settings; the cluster sets its listeners and the scheduler it dials.
    http: HttpConfig = field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        from alise.modelinfo.source import check_model

        check_model(self.model)  # every service runs here: the model must be found here, before any starts
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

    @property
    def policy(self) -> str:
        return self.scheduler.scheduling.policy

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
    """The ``alise`` sub-commands of each service (without the program name): each service's
    config, with what the cluster decides, as its flags. Ports given as 0 are resolved to free
    ones here, so every command names real ports."""
    from alise.http.main import flags as http_flags
    from alise.predictor.cli import SERVE_FLAGS as PREDICTOR_FLAGS
    from alise.predictor.config import PredictorConfig
    from alise.scheduler.main import FLAGS as SCHEDULER_FLAGS
    from alise.worker.main import FLAGS as WORKER_FLAGS

    address = resolve(cfg.listen_address("address"))
    predictor_address = resolve(cfg.listen_address("predictor_address"))
    worker_address = resolve(cfg.listen_address("worker_address"))

    def metrics(offset: int) -> str:
        return "" if cfg.metrics_base_port is None else _port(cfg.metrics_base_port, offset, cfg.host)

    commands: dict[str, list[str]] = {}
    if cfg.predictor:
        predictor = PredictorConfig(address=predictor_address, metrics_address=metrics(1),
                                    index_dir=os.path.join(cfg.state_dir, "predictor"))
        commands["predictor"] = ["predictor", "serve", *config_argv(predictor, PREDICTOR_FLAGS,
                                                                    always=ALWAYS["predictor"])]
    scheduler = dataclasses.replace(
        cfg.scheduler, address=address, worker_address=worker_address, model=cfg.model,
        state_dir=os.path.join(cfg.state_dir, "scheduler"), max_model_len=cfg.worker.max_model_len,
        predictor_address=dial_address(predictor_address) if cfg.predictor else None,
        metrics_address=metrics(0), security=FROM_ENVIRONMENT)
    commands["scheduler"] = ["scheduler", *config_argv(scheduler, SCHEDULER_FLAGS,
                                                        always=ALWAYS["scheduler"])]
    for i in range(cfg.num_workers):
        worker = dataclasses.replace(
            cfg.worker, scheduler_address=dial_address(worker_address), model=cfg.model,
            worker_id=f"worker-{i}", health_address=_port(cfg.worker_health_base_port, i, cfg.host),
            metrics_address=metrics(2 + i))
        commands[f"worker-{i}"] = ["worker", *config_argv(worker, WORKER_FLAGS, always=ALWAYS["worker"])]
    if cfg.http_address != "":
        http = dataclasses.replace(
            cfg.http, address=resolve(cfg.listen_address("http_address")),
            scheduler_address=dial_address(address),
            health_address=resolve(cfg.listen_address("http_health_address")))
        commands["http"] = ["http", *config_argv(http, http_flags(), always=ALWAYS["http"])]
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
