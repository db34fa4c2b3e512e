"""The model families the runner serves: one :class:`DecoderSpec` per model (what its forward
computes and where its weights live), built from its config by :func:`describe`; and the
preset architectures (published shapes, random weights)."""

from alise.worker.families.describe import FAMILIES, STATIC_ROPE_TYPES, describe, hf_attention, rope_parameters
from alise.worker.families.presets import MINILM_VOCAB_SIZE, PRESETS, preset_config
from alise.worker.families.spec import DecoderSpec, LayerSpec, MoeSpec, RopeTable, WeightPaths

__all__ = ["FAMILIES", "MINILM_VOCAB_SIZE", "PRESETS", "STATIC_ROPE_TYPES", "DecoderSpec", "LayerSpec", "MoeSpec",
           "RopeTable", "WeightPaths", "describe", "hf_attention", "preset_config", "rope_parameters"]
