"""Settings of the scheduler service (read from flags and env in the entrypoint only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alise.common.grpc_server import split_host_port
from alise.common.security import SecurityConfig, is_loopback
from alise.core.choices import PLANNER_NAMES, POLICY_NAMES


@dataclass(frozen=True)
class SchedulerConfig:
    #: Where clients connect (SchedulerService: Generate, GetStatus).
    address: str = "127.0.0.1:50051"
    #: Where workers connect (WorkerService), a listener of its own: a worker sees every
    #: prompt it is given. "" = 127.0.0.1 and the client port + 1 (any free port when the
    #: client port is 0). A worker must prove itself here (internal secret or mTLS) unless
    #: both listeners are on loopback and no API tokens are set.
    worker_address: str = ""
    #: Model directory or preset name, the same the workers serve (None = embedded default).
    model: str | None = None
    #: Scheduling policy: alise (the product: shortest predicted remaining time), fcfs or oracle.
    policy: str = "alise"
    #: Context limit override in tokens (None = the model's).
    max_model_len: int | None = None
    #: max_tokens for requests that leave it unset.
    default_max_tokens: int = 256
    #: Requests in flight (queued + running) before RESOURCE_EXHAUSTED.
    max_queued: int = 4096
    #: Calls in progress on the client listener before RESOURCE_EXHAUSTED (the backstop
    #: above the queue bound; health checks do not count). 0 = max_queued + 1024.
    max_calls: int = 0
    #: How long a request waits while no worker is connected before UNAVAILABLE.
    max_wait_no_worker_s: float = 30.0
    #: Predictor address (None = running-mean estimates only).
    predictor_address: str | None = None
    #: Deadline of one predictor call.
    predictor_timeout_s: float = 0.25
    #: Latency profile JSON of the workers' device (None = the first worker's, else a default
    #: refined online).
    latency_profile: str | None = None
    #: Where paused jobs' KV goes: "" = by policy (fcfs: drop; alise / oracle: adaptive), or
    #: one of adaptive, drop, swap, quantize (see alise.core.memory_planner).
    kv_planner: str = ""
    #: Plans kept in flight per worker: the worker runs step k while step k + 1 is planned
    #: (1 = lock-step: the worker waits for each plan).
    plans_ahead: int = 2
    #: A step that carries prompt chunks beside decodes costs at most this many times the decode
    #: step alone, by the workers' measured latency profile (chunks are cut to fit; 0 = only
    #: the workers' token budget limits them).
    prefill_step_ratio: float = 1.5
    #: Longest prompt text accepted, in characters (tokenizing it must stay cheap).
    max_prompt_chars: int = 4_000_000
    #: Grace period for in-flight requests on SIGTERM.
    drain_grace_s: float = 10.0
    #: Tokens, internal secret, TLS.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Prometheus metrics HTTP address ("" = none).
    metrics_address: str = ""
    #: Append one JSON line per finished job to this file ("" = none): its length estimate
    #: (mean, p50, p90, source), true output length, TTFT, end-to-end time, preemptions.
    job_log: str = ""
    #: Directory of the scheduler's own state ("" = none): the requests that crashed it
    #: (``alise.scheduler.quarantine``), refused after a restart.
    state_dir: str = ""

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        if self.kv_planner and self.kv_planner not in PLANNER_NAMES:
            raise ValueError(f"kv_planner must be one of {', '.join(PLANNER_NAMES)}, got {self.kv_planner!r}")
        for name in ("default_max_tokens", "max_queued", "max_prompt_chars", "plans_ahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_step_ratio and self.prefill_step_ratio <= 1:
            raise ValueError(f"prefill_step_ratio must be 0 (off) or > 1, got {self.prefill_step_ratio}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's), got {self.max_model_len}")
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
