"""Which kernel each piece of a step runs on this device, and the layer ops that follow the choice.

A :class:`KernelPlan` is decided once, at start-up, by :mod:`alise.worker.model.tuning` (each fast
kernel checked against its torch reference on the device, then timed against the alternatives
per shape); the default plan is the plain torch path, which is also what the CPU runs. The
:class:`LayerOps` of a runner read the plan at every call, so a CUDA graph captured after the
plan is fixed records the chosen kernels.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: (out_features, in_features, rows) of one matmul.
LinearKey = tuple[int, int, int]


@dataclass
class KernelPlan:
    """The chosen implementation of each piece. Defaults: torch everywhere (cuBLAS matmuls, torch
    norms and rotary, the per-chunk attention path for prefill, no mixed-step graphs)."""

    #: Residual add + norm as one Triton kernel (alise.worker.kernels.triton_fused.add_norm), for every
    #: norm of the model (LayerNorm, RMSNorm, Gemma's unit-offset RMSNorm).
    fused_norm: bool = False
    #: The gated activation act(gate) * up as one Triton kernel (SiLU or GELU-tanh).
    fused_act: bool = False
    #: Rotary + page write as one Triton kernel, in steps whose attention reads every key from
    #: the pages (decode and unified steps; see LayerOps.rope); full-width rotary only.
    fused_rope: bool = False
    #: Matmul backend by shape and rows: "cublaslt", or a triton_fused.SkinnyConfig; absent: cuBLAS.
    linear: dict[LinearKey, object] = field(default_factory=dict)
    #: Split-K ranges of the decode kernel by decode batch bucket; absent: its own heuristic.
    decode_splits: dict[int, int] = field(default_factory=dict)
    #: Split-K partials merged by the last split in the same launch (no merge kernel).
    fused_merge: bool = False
    #: Unified attention kernel config by token bucket (triton_unified.UnifiedConfig); empty: the
    #: unified kernel is off and prefill attention runs chunk by chunk.
    unified: dict[int, object] = field(default_factory=dict)
    #: Steps of more rows run attention per chunk (flash or padded cuDNN SDPA measured faster on a
    #: long fresh prompt); None: no limit.
    unified_max_tokens: int | None = None
    #: Lengths a fresh chunk's plain causal attention pads to for one cuDNN SDPA call each
    #: (attention.padded_causal_attention; every length's cuDNN plan built at start-up); empty:
    #: flash SDPA. A plan kept from before this choice existed loads as empty: flash SDPA is what
    #: it measured.
    cudnn_fresh_lengths: tuple[int, ...] = ()
    #: Token buckets whose mixed steps replay CUDA graphs (needs the unified kernel).
    mixed_graph_tokens: tuple[int, ...] = ()
    #: What start-up checked, measured and chose, line by line (logged; printed by the benches).
    report: list[str] = field(default_factory=list)

    def decode_options(self, batch: int) -> dict | None:
        """Options of the decode kernel for a decode graph of ``batch`` sequences (None: defaults)."""
        if batch not in self.decode_splits:
            return None
        return dict(num_splits=self.decode_splits[batch], fused_merge=self.fused_merge)

    def unified_config(self, num_tokens: int):
        """The unified kernel's config for a step of ``num_tokens`` rows (None: kernel off)."""
        if not self.unified or (self.unified_max_tokens is not None and num_tokens > self.unified_max_tokens):
            return None
        buckets = sorted(self.unified)
        i = bisect.bisect_left(buckets, num_tokens)
        return self.unified[buckets[min(i, len(buckets) - 1)]]


@contextlib.contextmanager
def blas_library(library: str):
    """Within the block, torch's matmuls go to ``library`` ("cublas" or "cublaslt")."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` (ReLU): on CUDA the bias and ReLU go into cuBLASLt's epilogue."""
    if relu and bias is not None and x.is_cuda and hasattr(torch, "_addmm_activation"):
        return torch._addmm_activation(bias, x, weight.t())
    out = F.linear(x, weight, bias)
    return out.relu_() if relu else out


def norm_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight, bias, eps)`` of a LayerNorm or an RMSNorm module (Llama's or Gemma's)."""
    if isinstance(module, nn.LayerNorm):
        return module.weight, module.bias, module.eps
    eps = getattr(module, "variance_epsilon", None)
    return module.weight, None, module.eps if eps is None else eps


def reference_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   kind: str) -> torch.Tensor:
    """The norm of ``x``'s rows in float32, rounded where transformers' module rounds."""
    h = x.float()
    if kind == "layer":
        return F.layer_norm(h, h.shape[-1:], weight.float(), bias.float() if bias is not None else None, eps)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms_unit_offset":
        return normed * (1.0 + weight.float())
    return weight.float() * normed.to(x.dtype).float()


#: Gated activations the fused kernel computes (config names -> the kernel's).
FUSED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class LayerOps:
    """The matmuls, norms and rotary of a forward pass, dispatched by a :class:`KernelPlan`.
    ``norm_kind`` and ``activation`` are the model's (alise.worker.model.families.spec): what the fused
    kernels must compute where the plan picks them; the torch path calls the HF modules."""

    def __init__(self, plan: KernelPlan | None = None, *, norm_kind: str = "rms", activation: str = "silu") -> None:
        self.plan = plan or KernelPlan()
        self.norm_kind = norm_kind
        self.activation = activation

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               relu: bool = False) -> torch.Tensor:
        choice = self.plan.linear.get((weight.shape[0], weight.shape[1], x.shape[0]))
        if choice is None:
            return torch_linear(x, weight, bias, relu)
        if choice == "cublaslt":
            with blas_library("cublaslt"):
                return torch_linear(x, weight, bias, relu)
        from alise.worker.kernels.triton_fused import skinny_linear

        return skinny_linear(x, weight, bias, relu=relu, config=choice)

    def add_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None,
                 norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` with ``s = hidden + delta`` (``hidden`` when ``delta`` is None)."""
        if self.plan.fused_norm:
            from alise.worker.kernels.triton_fused import add_norm

            weight, bias, eps = norm_params(norm)
            return add_norm(hidden, delta, weight, bias, eps, kind=self.norm_kind)
        total = hidden if delta is None else hidden + delta
        return total, norm(total)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``norm(x)`` over the last dim of ``x`` (rows of any leading shape: a layer's output, or
        the query/key heads ``[T, heads, head_dim]``)."""
        if self.plan.fused_norm:
            return self.add_norm(x.reshape(-1, x.shape[-1]), None, norm)[1].view(x.shape)
        return norm(x)

    def gated(self, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
        """``act_fn(gate) * up`` of the fused gate/up output ``[T, 2 * I]``."""
        if self.plan.fused_act and self.activation in FUSED_ACTIVATIONS:
            from alise.worker.kernels.triton_fused import act_mul

            return act_mul(gate_up, FUSED_ACTIVATIONS[self.activation])
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up

    def rope(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
             write_kv, *, keys_from_pages: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary positions on ``query``/``key`` (``cos``/``sin [T, rotary_dim]``: the leading
        ``rotary_dim`` dims of each head rotate, the rest pass, as Phi-3's partial rotary does),
        the key and value written into the pages (by ``write_kv`` unless fused). Returns the
        rotated query and key. The fused kernel puts the rotated key only into the pages and
        returns None for it, so it runs only where the step's attention reads every key from the
        pages (``keys_from_pages``), and only for full-width rotary."""
        rotary_dim = cos.shape[-1]
        if self.plan.fused_rope and keys_from_pages and rotary_dim == query.shape[-1]:
            from alise.worker.kernels.triton_fused import rope_write_kv

            return rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping), None
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        write_kv(key_cache, value_cache, key, value, slot_mapping)
        return query, key


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions (rotate-half form) on the leading ``cos.shape[-1]`` dims of each head of
    ``x [T, heads, dim]``; ``cos``/``sin [T, rotary_dim]``."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([head * cos + rotate_half(head) * sin, rest], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plan_to_json(plan: KernelPlan, key: dict) -> str:
    """``plan`` with the ``key`` it was planned for (device, model shapes, versions), as JSON."""
    import json

    def config(choice) -> object:
        if isinstance(choice, str):
            return choice
        return {"type": type(choice).__name__, **{k: getattr(choice, k) for k in choice.__dataclass_fields__}}
    return json.dumps(dict(
        key=key, fused_norm=plan.fused_norm, fused_act=plan.fused_act, fused_rope=plan.fused_rope,
        linear=[[list(k), config(v)] for k, v in plan.linear.items()],
        decode_splits=[[b, n] for b, n in plan.decode_splits.items()], fused_merge=plan.fused_merge,
        unified=[[t, config(c)] for t, c in plan.unified.items()], unified_max_tokens=plan.unified_max_tokens,
        cudnn_fresh_lengths=list(plan.cudnn_fresh_lengths), mixed_graph_tokens=list(plan.mixed_graph_tokens),
        report=plan.report), indent=1)


def plan_from_json(text: str, key: dict) -> KernelPlan | None:
    """The plan in ``text`` if it was made for ``key``, else None (plan again)."""
    import json

    from alise.worker.kernels.triton_fused import SkinnyConfig
    from alise.worker.kernels.triton_unified import UnifiedConfig

    data = json.loads(text)
    if data.get("key") != key:
        return None
    types = {"SkinnyConfig": SkinnyConfig, "UnifiedConfig": UnifiedConfig}

    def config(value) -> object:
        if isinstance(value, str):
            return value
        value = dict(value)
        return types[value.pop("type")](**value)
    return KernelPlan(
        fused_norm=data["fused_norm"], fused_act=data["fused_act"], fused_rope=data["fused_rope"],
        linear={tuple(k): config(v) for k, v in data["linear"]},
        decode_splits={int(b): int(n) for b, n in data["decode_splits"]}, fused_merge=data["fused_merge"],
        unified={int(t): config(c) for t, c in data["unified"]}, unified_max_tokens=data["unified_max_tokens"],
        cudnn_fresh_lengths=tuple(int(n) for n in data.get("cudnn_fresh_lengths", ())),
        mixed_graph_tokens=tuple(data["mixed_graph_tokens"]),
        report=[f"(loaded) {line}" for line in data["report"]])
