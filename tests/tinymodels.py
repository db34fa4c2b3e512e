"""Tiny random checkpoints on disk, so tests exercise the real ``load_model(directory)`` path.

``make_tiny_model_dir(tmp_path, family)`` writes a Hugging Face-format directory (config.json,
safetensors weights, the MiniLM WordPiece tokenizer) of a ~2M-parameter model of any served
family in well under a second: one file, or shards with ``model.safetensors.index.json``
(``shard_size``), in float32 or another dtype (``dtype``), tied embeddings by override
(``tie_word_embeddings=True``). Weights are random but fixed by ``seed``; every norm weight and
router is drawn at random too (transformers starts them at 1, 0 or uniform), so a norm computed
the wrong way or a wrong expert shows in the logits.

The tiny configs give sliding windows of 5 tokens (test sequences run past 5, so the window cuts),
Gemma 2 soft-caps small enough to bend the logits, and a Gemma scale unlike ``head_dim ** -0.5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

from alise.modelinfo.presets import MINILM_VOCAB_SIZE
from alise.modelinfo.tokenizer import minilm_tokenizer
from alise.worker.model.families import describe, hf_attention

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_WINDOW = 5
_GEMMA = dict(_LLAMA_LIKE, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=_WINDOW,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)

#: family -> (config model_type, config fields).
_BASE: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(_LLAMA_LIKE, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True)),
    # Layer 0 full, layer 1 windowed (max_window_layers), QKV with biases.
    "qwen2": ("qwen2", dict(_LLAMA_LIKE, use_sliding_window=True, sliding_window=_WINDOW, max_window_layers=1)),
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=_WINDOW,
                            max_window_layers=1)),
    "mistral": ("mistral", dict(_LLAMA_LIKE, sliding_window=_WINDOW)),
    "phi3": ("phi3", dict(_LLAMA_LIKE, sliding_window=_WINDOW, original_max_position_embeddings=256)),
    # Layers: windowed, global, windowed.
    "gemma2": ("gemma2", dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(_GEMMA, sliding_window_pattern=2, final_logit_softcapping=3.0, rope_theta=1e6,
                                   rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=_WINDOW)),
    # Layer 0 a dense MLP, layer 1 routed experts.
    "qwen3_moe": ("qwen3_moe", dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0])),
}

FAMILIES = tuple(_BASE)


#: The MiniLM tokenizer's [PAD], [CLS] and [SEP]: constants, so a config needs no tokenizer
#: package (the GPU image has none).
_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family`` with the MiniLM vocabulary and special ids."""
    if family not in _BASE:
        raise ValueError(f"family must be one of {sorted(_BASE)}, got {family!r}")
    model_type, base = _BASE[family]
    fields = base | dict(vocab_size=MINILM_VOCAB_SIZE, **_SPECIAL_IDS)
    return CONFIG_MAPPING[model_type](**(fields | overrides))


def tiny_model(config: PretrainedConfig, *, seed: int = 0) -> torch.nn.Module:
    """A float32 model of ``config`` with random weights, norm weights and routers included."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=hf_attention(describe(config, 64)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and "weight" in name:
                param.copy_(param.mean() + 0.3 * torch.randn_like(param))  # around 1 (or 0 for Gemma's)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.3)
    return model.eval()


def make_tiny_model_dir(path: Path, family: str = "llama", *, seed: int = 0, shard_size: str | None = None,
                        dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Save a tiny random ``family`` model plus tokenizer into ``path``; return it.

    ``overrides`` replace config fields, e.g. ``do_layer_norm_before=False, word_embed_proj_dim=32``
    for OPT-350m's post-norm, projected layout. ``shard_size`` (e.g. ``"2MB"``) splits the
    weights into shards with an index; ``dtype`` is the dtype they are stored (and declared) in.
    """
    model = tiny_model(tiny_config(family, **overrides), seed=seed).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    minilm_tokenizer().save_pretrained(path)
    return path
