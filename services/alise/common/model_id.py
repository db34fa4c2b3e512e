"""A model's identity as scheduler and workers compare it: its architecture, hashed.

Both sides read the same config (a checkpoint directory's config.json, or a preset's) and
hash the fields that decide what a token id means and what a forward pass computes, so a
worker serving another model (a tiny-opt worker beside a tiny-llama scheduler, say) is
refused even when the vocabulary sizes agree. Paths and names may differ between machines
(a volume mounted elsewhere) and are not part of it.
"""

from __future__ import annotations

import hashlib
import json

#: Config fields that identify an architecture (those a config lacks are skipped).
FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "intermediate_size", "ffn_dim", "word_embed_proj_dim",
          "max_position_embeddings", "do_layer_norm_before", "rope_theta", "tie_word_embeddings")


def model_fingerprint(config) -> str:
    """``<model_type>:<12 hex digits>`` of a transformers config's architecture fields."""
    fields = {name: getattr(config, name) for name in FIELDS if getattr(config, name, None) is not None}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{fields.get('model_type', 'model')}:{digest}"
