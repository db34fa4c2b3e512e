"""Settings of the worker service (read from flags and env in the entrypoint only)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from alise.common.security import SecurityConfig
from alise.core.blocks import default_token_budget


#: Values of ``WorkerConfig.runner``.
RUNNERS = ("paged", "transformers")
#: Values of ``WorkerConfig.dtype``, vLLM's names ("half" is float16, "float" float32).
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


@dataclass(frozen=True)
class WorkerConfig:
    #: The scheduler's worker listener to dial (its ``worker_address``).
    scheduler_address: str = "127.0.0.1:50052"
    #: Model directory or preset name (None = the embedded default).
    model: str | None = None
    #: "cpu", "cuda", "cuda:1", ...
    device: str = "cpu"
    #: Weights' and activations' dtype, one of DTYPES: "auto" is float32 on CPU, float16 on a
    #: GPU. The aliases are stored by their full names.
    dtype: str = "auto"
    #: Tokens per KV block.
    block_size: int = 16
    #: Device KV blocks; 0 sizes the cache from kv_cache_bytes (CPU) or free memory (CUDA).
    num_device_blocks: int = 0
    #: KV budget on CPU when num_device_blocks is 0.
    kv_cache_bytes: int = 256 << 20
    #: Share of the GPU's total memory this worker may hold, weights, activations and KV cache
    #: together (vLLM's meaning): the KV cache gets the share less what is in use once the
    #: weights are loaded (theirs, and anything else on the device).
    gpu_memory_utilization: float = 0.9
    #: Host (CPU) KV blocks for swapped-out jobs.
    num_host_blocks: int = 0
    #: Sequences in one step.
    max_num_seqs: int = 64
    #: Tokens one step may feed (decodes, then prompt chunks); 0 = 256, or twice
    #: max_num_seqs if more (``alise.core.blocks.default_token_budget`` says why).
    max_num_batched_tokens: int = 0
    #: Context limit override (None = the model's).
    max_model_len: int | None = None
    #: Identity shown in status and metrics, unique among a scheduler's workers ("" = host
    #: and device, which stay the same when the worker restarts).
    worker_id: str = ""
    #: Where this worker serves its health check ("" = no health port).
    health_address: str = "127.0.0.1:0"
    #: Seed of random weights for preset models: workers given the same seed serve the same
    #: model.
    seed: int = 0
    reconnect_delay_s: float = 1.0
    #: How long jobs are kept, paused, after the scheduler is lost, for a restarted one to adopt.
    orphan_ttl_s: float = 60.0
    #: Latency profile file (alise.core.latency_model JSON): loaded at start-up, or, with
    #: profile_latency, where the measured profile is written ("" = none).
    latency_profile: str = ""
    #: Measure this engine's step times over a grid at start-up and fit a latency profile.
    profile_latency: bool = False
    #: Append one JSON line per model step to this file ("" = none): step id, sequences,
    #: context tokens, prefill chunk lengths, seconds of forward + sampling. These are the
    #: samples ``LatencyModel.fit`` takes, measured while serving (bench/fit_steps.py).
    step_log: str = ""
    #: Capture CUDA graphs for decode steps at start-up (CUDA with Triton only; ignored on CPU).
    cuda_graphs: bool = True
    #: Check and time the fused kernels at start-up and keep the fastest per shape (CUDA with
    #: Triton; False: the plain torch path).
    fast_kernels: bool = True
    #: File of the kernel plan: used as it is when it was made for this device, model and sizes,
    #: else planned at start-up and written there ("" = plan at every start).
    kernel_plan: str = ""
    #: Forward pass: "paged" (ModelRunner) or "transformers" (TransformersRunner, the plain HF
    #: forward as a baseline; cuda_graphs does not apply, profile_latency is refused).
    runner: str = "paged"
    #: Internal secret and TLS for the channel to the scheduler.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Prometheus metrics HTTP address ("" = none).
    metrics_address: str = ""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be 0 (automatic) "
                             f"or >= max_num_seqs ({self.max_num_seqs}): every running sequence decodes "
                             "a token each step")
        for name in ("num_device_blocks", "num_host_blocks", "kv_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's), got {self.max_model_len}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.orphan_ttl_s < 0:
            raise ValueError(f"orphan_ttl_s must be >= 0, got {self.orphan_ttl_s}")
        if self.reconnect_delay_s <= 0:
            raise ValueError(f"reconnect_delay_s must be > 0, got {self.reconnect_delay_s}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.runner != "paged" and self.profile_latency:
            raise ValueError(f"profile_latency needs runner 'paged', got runner {self.runner!r}")

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or default_token_budget(self.max_num_seqs)

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or default_worker_id(self.device)


def default_worker_id(device: str) -> str:
    """HOST-DEVICE: ``node1-cpu``, ``node1-cuda0``; a CUDA index is the physical one (through
    CUDA_VISIBLE_DEVICES), so two workers of one host on different GPUs differ."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        position = int(index) if index.isdigit() else 0
        index = visible[position] if position < len(visible) else str(position)
    return f"{socket.gethostname()}-{kind}{index}"
