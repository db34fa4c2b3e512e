"""Settings of the scheduler service (read from flags and env in the entrypoint only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alise.common.security import SecurityConfig
from alise.core.choices import PLANNER_NAMES, POLICY_NAMES


@dataclass(frozen=True)
class SchedulerConfig:
    #: Where clients and workers connect (one port serves both services).
    address: str = "127.0.0.1:50051"
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
        for name in ("max_wait_no_worker_s", "predictor_timeout_s", "drain_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if ":" not in self.address:
            raise ValueError(f"address must look like HOST:PORT, got {self.address!r}")
