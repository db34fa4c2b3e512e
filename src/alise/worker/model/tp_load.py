"""A tensor-parallel rank's weights, built in its slices only (:mod:`alise.worker.model.tp_shard`).

The transformers model is built with its parameters on the ``meta`` device (no memory, no
initialization; buffers such as the rotary frequencies are real), then each parameter is
replaced by the rank's part of it:

- from a safetensors checkpoint, read slice by slice (``safe_open(...).get_slice``): a rank
  reads its rows or columns of each tensor, never the whole checkpoint. A checkpoint whose
  tensor names are not the model's parameters (routed experts stored one module per expert,
  which transformers fuses while loading) is loaded whole on the host and cut in memory;
- for a preset, drawn at random: matrices from N(0, initializer_range), norm weights 1 (0 for
  Gemma's ``1 + weight``), biases 0. A sharded part is drawn from a stream of its own
  (seed, name, rank, ranks), a replicated one from (seed, name), so every rank holds the same
  replicated weights; the model therefore depends on the number of ranks, as a seed's does.
"""

from __future__ import annotations

import contextlib
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
        missing = [name for name, _ in model.named_parameters() if reader.find(name) is None]
        if missing:
            logger.warning("%s: %d parameters (%s, ...) are not tensors of the checkpoint as named: loading it "
                           "whole on the host and cutting it there", directory, len(missing), missing[0])
            return _load_whole_then_cut(directory, config, spec, tp, device, hf_options)
        make = lambda name, p: reader.read(name, rules.cut(name, tuple(p.shape)), tp.rank).to(device, dtype)  # noqa: E731
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
        """The checkpoint's name of parameter ``name`` (some checkpoints drop the ``model.`` prefix)."""
        for candidate in (name, name.partition(".")[2]):
            if candidate in self.weight_map:
                return candidate
        return None

    def read(self, name: str, cut: Cut, rank: int) -> torch.Tensor:
        key = self.find(name)
        file = self.weight_map[key]
        if file not in self._files:
            self._files[file] = safe_open(str(self.directory / file), framework="pt")
        tensor = self._files[file].get_slice(key)
        if cut.driver_only and rank > 0:
            return torch.zeros(tensor.get_shape(), dtype=_dtype_of(tensor.get_dtype()))
        if cut.dim is None or cut.driver_only:
            return tensor[:]
        lead = (slice(None),) * cut.dim
        parts = [tensor[(*lead, slice(start, start + n))] for start, n in cut.ranges]
        return pad(torch.cat(parts, dim=cut.dim), cut)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype_of(name: str) -> torch.dtype:
    return _SAFETENSORS_DTYPES.get(name, torch.float32)


def _load_whole_then_cut(directory: Path, config: PretrainedConfig, spec: DecoderSpec, tp, device: torch.device,
                         hf_options: dict) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True,
                                                 use_safetensors=True, **hf_options)
    return shard_model(model, spec, tp.rank, tp.world_size).to(device)
