"""The model families the runner serves: one :class:`DecoderSpec` per model (what its forward
computes and where its weights live), built from its config by :func:`describe`."""

from alise.worker.model.families.describe import FAMILIES, STATIC_ROPE_TYPES, describe, hf_attention, rope_parameters
from alise.worker.model.families.spec import DecoderSpec, LayerSpec, MoeSpec, RopeTable, WeightPaths

__all__ = ["FAMILIES", "STATIC_ROPE_TYPES", "DecoderSpec", "LayerSpec", "MoeSpec", "RopeTable", "WeightPaths",
           "describe", "hf_attention", "rope_parameters"]
