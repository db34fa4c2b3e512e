"""Which slice of each weight a tensor-parallel rank holds (Megatron's layout), and the local spec.

Per decoder layer, with ``H`` query heads, ``K`` KV heads and ``N`` ranks, rank ``r`` holds:

- query heads ``[r H/N, (r+1) H/N)`` of the Q projection (rows) and of the attention output
  projection (columns); KV heads ``[r K/N, (r+1) K/N)`` of K and V when ``N`` divides ``K``,
  else (``K`` divides ``N``: fewer KV heads than ranks) the one KV head ``r K // N`` that its
  query heads read, replicated on the ``N / K`` ranks that share it;
- rows ``[r I/N, (r+1) I/N)`` of each up-projection of the MLP (gate and up, or OPT's fc1) and
  the same columns of the down projection; routed experts the same slice of every expert;
- a row-parallel projection's bias on rank 0 only (zeros elsewhere), so the all-reduce adds it once;
- rows ``[r V', (r+1) V')`` of the embedding and the LM head, ``V' = ceil(V / N)``, zeros past ``V``.

Everything else (norms, routers, positions, OPT's projections in and out) is replicated. A
checkpoint whose Q/K/V or gate/up sit in one matrix (Phi-3) is cut per part. The cuts are
described per parameter name of the transformers model (:func:`cuts`), so one description
serves a model in memory (:func:`shard_model`), a safetensors checkpoint read slice by slice
and random weights drawn per slice (:mod:`alise.worker.model.tp_load`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from alise.worker.model.decoder import resolve
from alise.worker.model.families.spec import DecoderSpec


@dataclass(frozen=True)
class Cut:
    """Rank's part of one parameter: along ``dim``, the ``ranges`` (start, length) concatenated,
    then zero rows up to ``pad_to``; ``dim`` None: the whole tensor. ``driver_only``: rank 0 holds
    it, the others zeros (a row-parallel bias)."""

    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    pad_to: int = 0
    driver_only: bool = False

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(shape)
        rows = max(self.pad_to, sum(n for _, n in self.ranges))
        return (*shape[:self.dim], rows, *shape[self.dim + 1:])


REPLICATED = Cut()


@dataclass(frozen=True)
class HeadSplit:
    """Rank ``rank`` of ``world_size``: its query and KV heads (see the module docstring)."""

    num_heads: int
    num_kv_heads: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        n = self.world_size
        if self.num_heads % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the {self.num_heads} attention heads")
        if self.num_kv_heads % n and n % self.num_kv_heads:
            raise ValueError(f"tensor_parallel_size {n} and the {self.num_kv_heads} KV heads must divide one "
                             f"another (fewer KV heads than ranks are replicated, a whole head per rank)")

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world_size)

    @property
    def kv_start(self) -> int:
        return self.rank * self.num_kv_heads // self.world_size


def local_spec(spec: DecoderSpec, rank: int, world_size: int) -> DecoderSpec:
    """The spec one rank computes: its query and KV heads, the rest as the whole model."""
    heads = HeadSplit(spec.num_heads, spec.num_kv_heads, rank, world_size)
    return dataclasses.replace(spec, num_heads=heads.local_heads, num_kv_heads=heads.local_kv_heads)


def _even(size: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    if size % world_size:
        raise ValueError(f"tensor_parallel_size {world_size} must divide {what} ({size})")
    part = size // world_size
    return rank * part, part


def _parts(size: int, num_parts: int, rank: int, world_size: int, what: str) -> tuple[tuple[int, int], ...]:
    """Rank's slice of each of ``num_parts`` equal parts laid end to end (fused gate/up)."""
    part = size // num_parts
    start, n = _even(part, rank, world_size, what)
    return tuple((i * part + start, n) for i in range(num_parts))


class CutRules:
    """The cut of every parameter of one model for one rank, by parameter name and full shape."""

    def __init__(self, spec: DecoderSpec, config: PretrainedConfig, rank: int, world_size: int) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.heads = HeadSplit(spec.num_heads, spec.num_kv_heads, rank, world_size)
        self.vocab_size = config.vocab_size
        self.kinds = _kinds(spec)

    def cut(self, name: str, shape: tuple[int, ...]) -> Cut:
        kind = self.kinds.get(name)
        if kind is None or self.world_size == 1:
            return REPLICATED
        r, n, h, hd = self.rank, self.world_size, self.heads, self.spec.head_dim
        q = (r * h.local_heads * hd, h.local_heads * hd)
        kv = (h.kv_start * hd, h.local_kv_heads * hd)
        match kind:
            case "vocab":
                per = -(-self.vocab_size // n)
                start = min(r * per, self.vocab_size)
                return Cut(0, ((start, min(self.vocab_size, start + per) - start),), pad_to=per)
            case "q":
                return Cut(0, (q,))
            case "kv":
                return Cut(0, (kv,))
            case "qkv_fused":
                full_q, full_kv = self.spec.num_heads * hd, self.spec.num_kv_heads * hd
                return Cut(0, (q, (full_q + kv[0], kv[1]), (full_q + full_kv + kv[0], kv[1])))
            case "o":
                return Cut(1, (q,))
            case "row_bias":
                return Cut(driver_only=True)
            case "up":
                return Cut(0, (_even(shape[0], r, n, f"{name}'s rows"),))
            case "gate_up_fused":
                return Cut(0, _parts(shape[0], 2, r, n, f"{name}'s rows"))
            case "down":
                return Cut(1, (_even(shape[1], r, n, f"{name}'s columns"),))
            case "experts_gate_up":
                return Cut(1, _parts(shape[1], 2, r, n, f"{name}'s rows"))
            case "experts_down":
                return Cut(2, (_even(shape[2], r, n, f"{name}'s columns"),))
        raise AssertionError(kind)


def _kinds(spec: DecoderSpec) -> dict[str, str]:
    """Parameter name -> kind of cut, for every parameter that is not replicated."""
    p = spec.paths
    kinds = {f"{p.body}.{p.embed}.weight": "vocab", f"{p.lm_head}.weight": "vocab", f"{p.lm_head}.bias": "vocab"}
    for i, layer in enumerate(spec.layers):
        at = f"{p.body}.{p.layers}.{i}."
        if len(p.qkv) == 1:
            kinds |= {f"{at}{p.qkv[0]}.{w}": "qkv_fused" for w in ("weight", "bias")}
        else:
            q, k, v = p.qkv
            kinds |= {f"{at}{path}.{w}": kind for path, kind in ((q, "q"), (k, "kv"), (v, "kv"))
                      for w in ("weight", "bias")}
        kinds |= {f"{at}{p.o_proj}.weight": "o", f"{at}{p.o_proj}.bias": "row_bias"}
        if layer.moe:
            kinds |= {f"{at}{spec.moe.experts}.gate_up_proj": "experts_gate_up",
                      f"{at}{spec.moe.experts}.down_proj": "experts_down"}
            continue
        up_kind = "gate_up_fused" if len(p.gate_up) == 1 and spec.family != "opt" else "up"
        kinds |= {f"{at}{path}.{w}": up_kind for path in p.gate_up for w in ("weight", "bias")}
        kinds |= {f"{at}{p.down}.weight": "down", f"{at}{p.down}.bias": "row_bias"}
    return kinds


def take(full: torch.Tensor, cut: Cut, rank: int) -> torch.Tensor:
    """Rank's part of ``full`` (a new tensor)."""
    if cut.driver_only:
        return full.clone() if rank == 0 else torch.zeros_like(full)
    if cut.dim is None:
        return full.clone()
    parts = [full.narrow(cut.dim, start, n) for start, n in cut.ranges]
    return pad(torch.cat(parts, dim=cut.dim), cut)


def pad(local: torch.Tensor, cut: Cut) -> torch.Tensor:
    """``local`` with zero rows appended up to ``cut.pad_to``."""
    missing = cut.pad_to - local.shape[cut.dim] if cut.dim is not None else 0
    if missing <= 0:
        return local
    shape = list(local.shape)
    shape[cut.dim] = missing
    return torch.cat([local, local.new_zeros(shape)], dim=cut.dim)


def replace_parameters(model: nn.Module, make) -> None:
    """Each parameter of ``model`` replaced by ``make(name, param)`` (tied ones once, still tied)."""
    made: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        new = made.get(id(param))
        if new is None:
            new = made[id(param)] = nn.Parameter(make(name, param), requires_grad=False)
        owner, _, leaf = name.rpartition(".")
        setattr(resolve(model, owner) if owner else model, leaf, new)


def shard_model(model: nn.Module, spec: DecoderSpec, rank: int, world_size: int) -> nn.Module:
    """``model`` (the whole one, in memory) cut to rank's parts, in place."""
    rules = CutRules(spec, model.config, rank, world_size)
    with torch.no_grad():
        replace_parameters(model, lambda name, p: take(p.detach(), rules.cut(name, tuple(p.shape)), rank))
    return model
