"""Settings of the scheduler service (read from flags and env in the entrypoint only).

Each field is a flag of `alise scheduler` (``alise.scheduler.main``), its ``#:`` comment the
flag's help; the fields of ``scheduling`` are the core's (``alise.core.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alise.common.grpc_server import split_host_port
from alise.common.security import SecurityConfig, is_loopback
from alise.core.config import SchedulingConfig


@dataclass(frozen=True)
class SchedulerConfig:
    #: Listen address for clients (SchedulerService: Generate, GetStatus).
    address: str = "127.0.0.1:50051"
    #: Listen address for workers, a listener of its own: a worker sees every prompt it is
    #: given (default: 127.0.0.1 and the client port + 1, any free port when that is 0). A
    #: worker must prove itself here (internal secret or mTLS) unless both listeners are on
    #: loopback and no API tokens are set.
    worker_address: str = ""
    #: Model directory or preset name, the one the workers serve (None: the embedded tiny-llama).
    model: str | None = None
    #: The policy, its knobs, the KV planner and the plans in flight.
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    #: Directory of the scheduler's own state: the requests that crashed it
    #: (``alise.scheduler.quarantine``), refused after a restart ("" = none, kept in memory).
    state_dir: str = ""
    #: Predictor address (None: no predictor, running-mean estimates).
    predictor_address: str | None = None
    #: Seconds one predictor call may take before the running mean stands in.
    predictor_timeout_s: float = 0.25
    #: Latency profile JSON of the workers' device (None: the first worker's, refined online).
    latency_profile: str | None = None
    #: Context limit in tokens, prompt and output (None: the model's).
    max_model_len: int | None = None
    #: max_tokens of a request that leaves it unset.
    default_max_tokens: int = 256
    #: Requests in flight (queued + running) before RESOURCE_EXHAUSTED.
    max_queued: int = 4096
    #: Calls in progress on the client listener before RESOURCE_EXHAUSTED, health checks not
    #: counted: the backstop above the queue bound (0 = max_queued + 1024).
    max_calls: int = 0
    #: Seconds a request waits while no worker is connected before UNAVAILABLE.
    max_wait_no_worker_s: float = 30.0
    #: Longest prompt text accepted, in characters (tokenizing it must stay cheap).
    max_prompt_chars: int = 4_000_000
    #: Seconds in-flight requests get to finish on SIGTERM.
    drain_grace_s: float = 10.0
    #: Append one JSON line per finished job to this file ("" = none): its length estimate
    #: (mean, p50, p90, source), true output length, TTFT, end-to-end time, preemptions.
    job_log: str = ""
    #: Serve Prometheus metrics over HTTP here, e.g. 127.0.0.1:9400 ("" = none).
    metrics_address: str = ""
    #: Serve clients from a process of their own (``alise.scheduler.front``): their calls, token
    #: streams and text, so the planning process's CPU goes to plans and workers (many workers).
    streams_process: bool = False
    #: Tokens, internal secret, TLS.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_queued", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's), got {self.max_model_len}")
        from alise.modelinfo.source import check_model

        check_model(self.model)
        if self.max_calls < 0:
            raise ValueError(f"max_calls must be >= 0 (0 = automatic), got {self.max_calls}")
        for name in ("max_wait_no_worker_s", "predictor_timeout_s", "drain_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("address", "worker_listen_address"):
            try:
                split_host_port(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name} must look like HOST:PORT, got {getattr(self, name)!r}") from None
        client_port, worker_port = (split_host_port(a)[1] for a in (self.address, self.worker_listen_address))
        if worker_port > 65535:
            raise ValueError("worker_address defaults to the client port + 1, past 65535 here; set it")
        if client_port and client_port == worker_port:
            raise ValueError(f"address and worker_address must be different ports, both are {client_port}")
        self._check_worker_credential()

    def _check_worker_credential(self) -> None:
        """A process that registers as a worker reads the prompts it is given: the worker
        listener is open only where nobody but this host can reach any listener and no one
        has to prove who they are on the client side either."""
        if self.security.has_internal_credential:
            return
        fix = ("set an internal secret (--internal-secret-file, or env ALISE_INTERNAL_SECRET) that "
               "the workers are given too, or mutual TLS (--tls-client-ca)")
        if self.security.api_tokens:
            raise ValueError(f"API tokens are set but workers need no credential: anyone who reaches "
                             f"the worker listener ({self.worker_listen_address}) could register as a "
                             f"worker and read every prompt; {fix}")
        for name, address in (("address", self.address), ("worker_address", self.worker_listen_address)):
            if not is_loopback(address):
                raise ValueError(f"{name} {address} is not loopback-only, and workers need no credential: "
                                 f"anyone who reaches the worker listener could register as a worker and "
                                 f"read every prompt; {fix}")

    @property
    def worker_listen_address(self) -> str:
        """``worker_address``, or its default from the client address."""
        if self.worker_address:
            return self.worker_address
        port = self.address.rpartition(":")[2]
        return f"127.0.0.1:{int(port) + 1 if port.isdigit() and int(port) else 0}"

    @property
    def max_calls_in_progress(self) -> int:
        return self.max_calls or self.max_queued + 1024
