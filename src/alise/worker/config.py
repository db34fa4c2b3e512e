"""Settings of the worker service (read from flags and env in the entrypoint only).

Each field is a flag of `alise worker` (``alise.worker.main``), its ``#:`` comment the flag's
help; `alise up` takes the same flags for all its workers.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from alise.common.security import SecurityConfig
from alise.core.blocks import default_token_budget
from alise.core.config import check_choices

#: Values of ``WorkerConfig.dtype``, vLLM's names ("half" is float16, "float" float32).
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
#: Values of ``WorkerConfig.kv_cache_dtype`` (alise.worker.model.kv_cache.KV_CACHE_DTYPES).
KvCacheDtype = Literal["auto", "fp8_e4m3"]


@dataclass(frozen=True)
class WorkerConfig:
    #: The scheduler's worker listener to dial, its --worker-address.
    scheduler_address: str = "127.0.0.1:50052"
    #: Model directory or preset name (None: the embedded tiny-llama).
    model: str | None = None
    #: Device: cpu, cuda, cuda:1, ...
    device: str = "cpu"
    #: Weights' and activations' dtype (auto: float32 on the CPU, float16 on a GPU); the
    #: aliases half and float are stored by their full names.
    dtype: Dtype = "auto"
    #: Seed of a preset model's random weights (workers with one seed serve one model).
    seed: int = 0
    #: Share of the GPU's memory the worker may hold, weights, activations and KV cache
    #: together (vLLM's meaning): the KV cache gets what the weights (and anything else on the
    #: device) leave of it.
    gpu_memory_utilization: float = 0.9
    #: Sequences in one step.
    max_num_seqs: int = 64
    #: Tokens one step may feed, decodes first, then prompt chunks (chunked prefill); 0 = 256,
    #: or twice max_num_seqs if more (``alise.core.blocks.default_token_budget`` says why).
    max_num_batched_tokens: int = 0
    #: Context limit in tokens, prompt and output (None: the model's).
    max_model_len: int | None = None
    #: Tokens per KV block.
    block_size: int = 16
    #: Ranks the model is split over (vLLM's --tensor-parallel-size): this process and N-1
    #: children, on devices cuda:i .. cuda:i+N-1 (or all on the CPU, gloo), one replica and one
    #: connection to the scheduler; the KV sizes below are per rank.
    tensor_parallel_size: int = 1
    #: KV pages' dtype (vLLM's names): auto (the model's dtype) or fp8_e4m3 (one byte a value,
    #: twice the blocks in the same memory; scale 1, saturating at +-448).
    kv_cache_dtype: KvCacheDtype = "auto"
    #: Device KV blocks (0: sized from kv_cache_mib on the CPU, from gpu_memory_utilization
    #: on CUDA).
    num_device_blocks: int = 0
    #: KV cache on the CPU, in MiB, when num_device_blocks is 0.
    kv_cache_mib: int = 256
    #: Host (CPU) KV blocks for swapped-out jobs; the adaptive planner's host moves need them.
    num_host_blocks: int = 0
    #: Name shown in status and metrics, unique among a scheduler's workers ("" = HOST-DEVICE,
    #: e.g. node1-cuda0, the same after a restart; two workers on one host and device need
    #: their own).
    worker_id: str = ""
    #: Where to serve grpc.health.v1, SERVING while connected to the scheduler (port 0 = any
    #: free port, "" = nowhere).
    health_address: str = "127.0.0.1:0"
    #: Seconds between attempts to reach a lost scheduler.
    reconnect_delay_s: float = 1.0
    #: Seconds jobs are kept, paused with their KV, after the scheduler is lost, for a
    #: restarted one to adopt.
    orphan_ttl_s: float = 60.0
    #: Latency profile JSON (alise.core.latency_model) to load at start-up, or to write with
    #: profile_latency ("" = none).
    latency_profile: str = ""
    #: Measure this engine's step times over a grid at start-up and fit a latency profile.
    profile_latency: bool = False
    #: Append one JSON line per model step to this file ("" = none): step id, sequences,
    #: context tokens, prefill chunk lengths, seconds of forward + sampling, the samples
    #: ``LatencyModel.fit`` takes (bench/fit_steps.py).
    step_log: str = ""
    #: Capture CUDA graphs for decode steps at start-up (CUDA with Triton only; off: eager).
    cuda_graphs: bool = True
    #: Launch the next step before this one's tokens reach the host, its decodes' input ids
    #: taken on the device (vLLM's async scheduling; the paged runner on one device, others
    #: run steps one after another; on the CPU a launch completes before it returns, so steps
    #: run in turn either way). Same tokens and reports; the step log's seconds are each
    #: step's own device time. On by default: served decode on an H100 went from 1.31-1.43x
    #: of the bandwidth floor to 1.07-1.22x (docs/benchmarks.md, "Model families on the GPU").
    async_steps: bool = True
    #: Check and time the fused kernels at start-up and keep the fastest per shape (CUDA with
    #: Triton; off: the plain torch path).
    fast_kernels: bool = True
    #: File of the start-up kernel plan: used as it is when made for this device, model and
    #: sizes, else planned and written there ("" = plan at every start).
    kernel_plan: str = ""
    #: Forward pass: paged (this engine's ModelRunner) or transformers (the plain HF forward,
    #: a baseline: cuda_graphs does not apply, profile_latency is refused).
    runner: Literal["paged", "transformers"] = "paged"
    #: Keep released full KV blocks, named by the hash of their tokens and prefix, for later
    #: requests that start with the same tokens: they compute only the rest (automatic prefix
    #: caching, vLLM's --enable-prefix-caching; the paged runner only).
    enable_prefix_caching: bool = True
    #: Serve Prometheus metrics over HTTP here, port 0 = any free port ("" = none).
    metrics_address: str = ""
    #: Internal secret and TLS for the channel to the scheduler.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("block_size", "max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be 0 (automatic) "
                             f"or >= max_num_seqs ({self.max_num_seqs}): every running sequence decodes "
                             "a token each step")
        for name in ("num_device_blocks", "num_host_blocks", "kv_cache_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's), got {self.max_model_len}")
        from alise.modelinfo.source import check_model

        check_model(self.model)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.orphan_ttl_s < 0:
            raise ValueError(f"orphan_ttl_s must be >= 0, got {self.orphan_ttl_s}")
        if self.reconnect_delay_s <= 0:
            raise ValueError(f"reconnect_delay_s must be > 0, got {self.reconnect_delay_s}")
        if self.tensor_parallel_size > 1 and self.runner != "paged":
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs runner 'paged', got runner "
                             f"{self.runner!r}")
        if self.runner != "paged" and self.profile_latency:
            raise ValueError(f"profile_latency needs runner 'paged', got runner {self.runner!r}")
        if self.runner != "paged" and self.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} needs runner 'paged' (the transformers "
                             f"runner keeps its own cache in the model's dtype), got runner {self.runner!r}")

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_mib << 20

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
