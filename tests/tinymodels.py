"""Tiny random checkpoints on disk, so tests exercise the real ``load_model(directory)`` path.

``make_tiny_model_dir(tmp_path)`` writes a Hugging Face-format directory (config.json,
model.safetensors, the MiniLM WordPiece tokenizer) of a ~2M-parameter model in well under a
second. Weights are random but fixed by ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from alise.worker.loader import MINILM_VOCAB_SIZE, minilm_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

_BASE: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True),
}


def make_tiny_model_dir(path: Path, family: str = "llama", *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``family`` ("llama" or "opt") model plus tokenizer into ``path``; return it.

    ``overrides`` replace config fields, e.g. ``do_layer_norm_before=False, word_embed_proj_dim=32``
    for OPT-350m's post-norm, projected layout.
    """
    if family not in _BASE:
        raise ValueError(f"family must be one of {sorted(_BASE)}, got {family!r}")
    tokenizer = minilm_tokenizer()
    fields = _BASE[family] | dict(vocab_size=MINILM_VOCAB_SIZE, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    config = (LlamaConfig if family == "llama" else OPTConfig)(**(fields | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
