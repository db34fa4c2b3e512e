"""Preset architectures: the published shapes of models people serve, built with random weights.

Each entry is a config's fields plus ``family`` (the config's ``model_type``). ``dtype`` is the
checkpoint's published dtype, which ``dtype="auto"`` follows on a GPU. The ``tiny-*`` presets
(MiniLM's 30522-token vocabulary, a few million parameters) are for tests and the CPU demo; their
sliding windows are shorter than a long prompt so the window really cuts.

Plain data, no transformers: the scheduler reads a preset's fields without torch; the worker
builds the transformers config from them (``alise.worker.model.loader.preset_config``).
"""

from __future__ import annotations

from typing import Any

#: Vocabulary of the MiniLM WordPiece tokenizer that presets use.
MINILM_VOCAB_SIZE = 30522

_OPT_REAL_VOCAB = 50272
_LLAMA_REAL_VOCAB = 32000
_QWEN_VOCAB = 151936


def _opt(hidden: int, layers: int, heads: int, ffn: int, vocab: int = _OPT_REAL_VOCAB, **extra: Any) -> dict:
    fields = dict(family="opt", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  ffn_dim=ffn, vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                  do_layer_norm_before=True, dtype="float16")
    return fields | extra


def _decoder(family: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int,
             max_pos: int, **extra: Any) -> dict:
    return dict(family=family, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                max_position_embeddings=max_pos, tie_word_embeddings=False) | extra


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int = _LLAMA_REAL_VOCAB,
           max_pos: int = 4096, **extra: Any) -> dict:
    fields = dict(rms_norm_eps=1e-5, rope_theta=10000.0, dtype="float16") | extra
    return _decoder("llama", hidden, layers, heads, kv_heads, inter, vocab, max_pos, **fields)


_LLAMA31_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=8192)
_GEMMA = dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, query_pre_attn_scalar=256,
              tie_word_embeddings=True, dtype="bfloat16")
_TINY = dict(vocab=MINILM_VOCAB_SIZE, max_pos=2048)

#: Preset name -> config fields. Every row but the tiny ones is a published shape.
PRESETS: dict[str, dict] = {
    "opt-125m": _opt(768, 12, 12, 3072),
    "opt-350m": _opt(1024, 24, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "opt-13b": _opt(5120, 40, 40, 20480),
    # 60 GB of fp16 weights: tensor parallelism (--tensor-parallel-size) on 80 GB cards.
    "opt-30b": _opt(7168, 48, 56, 28672),
    "llama-7b": _llama(4096, 32, 32, 32, 11008),
    "llama-13b": _llama(5120, 40, 40, 40, 13824),
    # Llama 3.1 8B, with its llama3 rotary scaling.
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, vocab=128256, max_pos=131072, dtype="bfloat16",
                         rope_parameters=_LLAMA31_ROPE),
    # 70B-class (140 GB of 16-bit weights: two or more GPUs by tensor parallelism); 8 KV heads.
    "llama-2-70b": _llama(8192, 80, 64, 8, 28672),
    "llama-3-70b": _llama(8192, 80, 64, 8, 28672, vocab=128256, max_pos=131072, dtype="bfloat16",
                          rope_parameters=_LLAMA31_ROPE),
    "qwen2.5-1.5b": _decoder("qwen2", 1536, 28, 12, 2, 8960, _QWEN_VOCAB, 32768, rms_norm_eps=1e-6,
                             rope_theta=1e6, tie_word_embeddings=True, dtype="bfloat16"),
    "qwen2.5-7b": _decoder("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, rms_norm_eps=1e-6, rope_theta=1e6,
                           dtype="bfloat16"),
    "qwen3-8b": _decoder("qwen3", 4096, 36, 32, 8, 12288, _QWEN_VOCAB, 40960, head_dim=128, rms_norm_eps=1e-6,
                         rope_theta=1e6, dtype="bfloat16"),
    # Mistral 7B v0.1: a 4096-token sliding window on every layer.
    "mistral-7b": _decoder("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, sliding_window=4096,
                           rms_norm_eps=1e-5, rope_theta=10000.0, dtype="bfloat16"),
    "phi-3-mini": _decoder("phi3", 3072, 32, 32, 32, 8192, 32064, 4096, original_max_position_embeddings=4096,
                           sliding_window=2047, rms_norm_eps=1e-5, rope_theta=10000.0, dtype="bfloat16"),
    "gemma-2-9b": _decoder("gemma2", 3584, 42, 16, 8, 14336, 256000, 8192, head_dim=256, sliding_window=4096,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_theta=10000.0,
                           **_GEMMA),
    "gemma-3-1b": _decoder("gemma3_text", 1152, 26, 4, 1, 6912, 262144, 32768, head_dim=256, sliding_window=512,
                           sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0, **_GEMMA),
    # Gemma 3 12B's text decoder: global layers rope_theta with linear scaling, local ones 10k.
    "gemma-3-12b": _decoder("gemma3_text", 3840, 48, 16, 8, 15360, 262208, 131072, head_dim=256,
                            sliding_window=1024, sliding_window_pattern=6, rope_theta=1e6,
                            rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
                            **_GEMMA),
    "mixtral-8x7b": _decoder("mixtral", 4096, 32, 32, 8, 14336, 32000, 32768, num_local_experts=8,
                             num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, dtype="bfloat16"),
    "qwen3-30b-a3b": _decoder("qwen3_moe", 2048, 48, 32, 4, 6144, _QWEN_VOCAB, 40960, head_dim=128,
                              moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                              norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, dtype="bfloat16"),
    "tiny-opt": _opt(256, 4, 4, 1024, vocab=MINILM_VOCAB_SIZE),
    "tiny-llama": _llama(256, 4, 4, 2, 704, vocab=MINILM_VOCAB_SIZE, max_pos=2048, dtype=None),
    "tiny-qwen2": _decoder("qwen2", 256, 4, 4, 2, 704, **_TINY, use_sliding_window=True, sliding_window=128,
                           max_window_layers=2, rms_norm_eps=1e-6),
    "tiny-qwen3": _decoder("qwen3", 256, 4, 4, 2, 704, **_TINY, head_dim=64, rms_norm_eps=1e-6),
    "tiny-mistral": _decoder("mistral", 256, 4, 4, 2, 704, **_TINY, sliding_window=128),
    "tiny-phi3": _decoder("phi3", 256, 4, 4, 4, 704, **_TINY, original_max_position_embeddings=2048,
                          sliding_window=127),
    "tiny-gemma2": _decoder("gemma2", 256, 4, 4, 2, 704, **_TINY, head_dim=64, sliding_window=128,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                            **(_GEMMA | dict(query_pre_attn_scalar=64))),
    "tiny-gemma3": _decoder("gemma3_text", 256, 4, 4, 2, 704, **_TINY, head_dim=64, sliding_window=128,
                            sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=10000.0,
                            rope_scaling=dict(rope_type="linear", factor=4.0),
                            **(_GEMMA | dict(query_pre_attn_scalar=64))),
    "tiny-mixtral": _decoder("mixtral", 256, 4, 4, 2, 352, **_TINY, num_local_experts=4, num_experts_per_tok=2),
    "tiny-qwen3-moe": _decoder("qwen3_moe", 256, 4, 4, 2, 704, **_TINY, head_dim=64, moe_intermediate_size=176,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0]),
}


#: [PAD], [CLS] and [SEP] of the MiniLM vocabulary: a preset's special ids without its tokenizer.
MINILM_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)


def preset_fields(name: str) -> dict[str, Any]:
    """Preset ``name`` as a config's fields: ``model_type`` for ``family``, the MiniLM special ids."""
    fields = dict(PRESETS[name])
    fields["model_type"] = fields.pop("family")
    return fields | MINILM_SPECIAL_IDS
