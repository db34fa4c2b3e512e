"""A tensor-parallel rank's weights, built in its slices only (:mod:`alise.worker.model.tp_shard`).

The transformers model is built with its parameters on the ``meta`` device (no memory, no
initialization; buffers such as the rotary frequencies are real), then each parameter is
replaced by the rank's part of it:

- from a safetensors checkpoint, read slice by slice (``safe_open(...).get_slice``): a rank
  reads its rows or columns of each tensor, never the whole checkpoint. Routed experts stored
  one module per expert (``experts.E.gate_proj``/``up_proj``/``down_proj``, Mixtral's
  ``w1``/``w3``/``w2`` under ``block_sparse_moe``), which transformers fuses into
  ``experts.gate_up_proj`` and ``experts.down_proj`` while loading, are read the same way: each
  expert's slice of each of its tensors, stacked. A checkpoint whose tensors are named neither
  way is loaded whole on the host and cut in memory;
- for a preset, drawn at random: matrices from N(0, initializer_range), norm weights 1 (0 for
  Gemma's ``1 + weight``), biases 0. A sharded part is drawn from a stream of its own
  (seed, name, rank, ranks), a replicated one from (seed, name), so every rank holds the same
  replicated weights; the model therefore depends on the number of ranks, as a seed's does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from alise.worker.model.families.spec import DecoderSpec
from alise.worker.model.tp_shard import REPLICATED, Cut, CutRules, pad, replace_parameters, shard_model

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside register their parameters on the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is a tie: kept, so it stays tied
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config: PretrainedConfig, hf_options: dict) -> nn.Module:
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, **hf_options)


def build_sharded(directory: Path | None, config: PretrainedConfig, spec: DecoderSpec, tp, device: torch.device,
                  hf_options: dict, seed: int) -> nn.Module:
    """Rank ``tp.rank``'s model: its parts of the checkpoint in ``directory``, or of random
    weights (``directory`` None), on ``device`` in ``hf_options["dtype"]``."""
    dtype = hf_options["dtype"]
    rules = CutRules(spec, config, tp.rank, tp.world_size)
    model = empty_model(config, hf_options)
    if directory is None:
        std = getattr(config, "initializer_range", 0.02)
        norm_fill = 0.0 if spec.norm == "rms_unit_offset" else 1.0
        make = _random_part(rules, seed, std, norm_fill, device, dtype)
    else:
        reader = CheckpointReader(directory)
        missing = [name for name, p in model.named_parameters() if not reader.has(name, tuple(p.shape))]
        if missing:
            logger.warning("%s: %d parameters (%s, ...) are not tensors of the checkpoint as named: loading it "
                           "whole on the host and cutting it there", directory, len(missing), missing[0])
            return _load_whole_then_cut(directory, config, spec, tp, device, hf_options)
        make = lambda name, p: reader.read(name, tuple(p.shape), rules.cut(name, tuple(p.shape)),  # noqa: E731
                                           tp.rank).to(device, dtype)
    with torch.no_grad():
        replace_parameters(model, make)
    return model.to(device)


def _random_part(rules: CutRules, seed: int, std: float, norm_fill: float, device: torch.device,
                 dtype: torch.dtype):
    def make(name: str, param: nn.Parameter) -> torch.Tensor:
        cut = rules.cut(name, tuple(param.shape))
        out = torch.zeros(cut.local_shape(tuple(param.shape)), dtype=dtype, device=device)
        if "norm" in name and name.endswith("weight"):
            return out.fill_(norm_fill)
        if name.endswith("bias") or (cut.driver_only and rules.rank > 0):
            return out
        key = f"{seed}/{name}" if cut == REPLICATED else f"{seed}/{name}/{rules.rank}/{rules.world_size}"
        generator = torch.Generator(device=device)
        generator.manual_seed(zlib.crc32(key.encode()))
        return out.normal_(0.0, std, generator=generator)
    return make


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file, or shards named by its index), read by slice."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        else:
            weight_map = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    weight_map |= dict.fromkeys(f.keys(), file.name)
        self.directory = directory
        self.weight_map = weight_map
        self._files: dict[str, object] = {}

    def find(self, name: str) -> str | None:
        """The checkpoint's name of parameter ``name`` (some checkpoints drop the ``model.`` prefix;
        Mixtral's keep ``block_sparse_moe`` for the MoE block transformers calls ``mlp``)."""
        for candidate in (name, name.replace(".mlp.", ".block_sparse_moe.")):
            for key in (candidate, candidate.partition(".")[2]):
                if key in self.weight_map:
                    return key
        return None

    def expert_keys(self, name: str, shape: tuple[int, ...]) -> list[list[str]] | None:
        """Per expert, the checkpoint's tensors that laid end to end along their rows are its
        part of the fused parameter ``name`` (gate then up; down); None: not stored so."""
        prefix, _, leaf = name.rpartition(".")
        for parts in _EXPERT_PARTS.get(leaf, ()):
            keys = [[self.find(f"{prefix}.{e}.{part}.weight") for part in parts] for e in range(shape[0])]
            if all(all(keys_of) for keys_of in keys):
                return keys
        return None

    def has(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.find(name) is not None or self.expert_keys(name, shape) is not None

    def _slice(self, key: str):
        file = self.weight_map[key]
        if file not in self._files:
            self._files[file] = safe_open(str(self.directory / file), framework="pt")
        return self._files[file].get_slice(key)

    def read(self, name: str, shape: tuple[int, ...], cut: Cut, rank: int) -> torch.Tensor:
        """Rank's part of parameter ``name`` (of full ``shape``), as ``take`` cuts the whole."""
        key = self.find(name)
        if key is None:
            keys = self.expert_keys(name, shape)
            return torch.stack([self._read_expert(k, shape, cut) for k in keys])
        tensor = self._slice(key)
        if cut.driver_only and rank > 0:
            return torch.zeros(tensor.get_shape(), dtype=_dtype_of(tensor.get_dtype()))
        if cut.dim is None or cut.driver_only:
            return tensor[:]
        lead = (slice(None),) * cut.dim
        parts = [tensor[(*lead, slice(start, start + n))] for start, n in cut.ranges]
        return pad(torch.cat(parts, dim=cut.dim), cut)

    def _read_expert(self, keys: list[str], shape: tuple[int, ...], cut: Cut) -> torch.Tensor:
        """One expert's part of a fused ``[experts, ...]`` parameter: its cut's ranges (along
        ``cut.dim``, the whole when replicated) read from the slices of ``keys`` that hold them."""
        dim = (cut.dim or 1) - 1  # an expert's tensors lack the fused leading experts dim
        ranges = cut.ranges if cut.dim is not None else ((0, shape[1]),)
        lead = (slice(None),) * dim
        tensors = [self._slice(k) for k in keys]
        offsets = list(itertools.accumulate((t.get_shape()[dim] for t in tensors), initial=0))
        pieces = []
        for start, n in ranges:
            for tensor, offset, end in zip(tensors, offsets, offsets[1:], strict=False):
                lo, hi = max(start, offset), min(start + n, end)
                if lo < hi:
                    pieces.append(tensor[(*lead, slice(lo - offset, hi - offset))])
        return torch.cat(pieces, dim=dim)


#: A fused expert parameter -> the names of each expert's tensors in a checkpoint, in the
#: fused order (transformers' conversion: gate and up concatenated, then down), per layout.
_EXPERT_PARTS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype_of(name: str) -> torch.dtype:
    return _SAFETENSORS_DTYPES.get(name, torch.float32)


def _load_whole_then_cut(directory: Path, config: PretrainedConfig, spec: DecoderSpec, tp, device: torch.device,
                         hf_options: dict) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True,
                                                 use_safetensors=True, **hf_options)
    return shard_model(model, spec, tp.rank, tp.world_size).to(device)
