"""Each supported architecture as a :class:`DecoderSpec` built from its transformers config.

The choices follow what transformers' own modules compute (the tests compare logits with
them): where a config field is ignored by transformers, it is ignored here too (Gemma 3's
``attn_logit_softcapping``). :func:`describe` refuses, with a message saying what to do, what
the paged runner cannot compute exactly: rotary scalings that depend on the batch's longest
sequence (``dynamic``; ``longrope`` past its original context), bidirectional attention, and
multimodal Gemma 3 checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from transformers import PretrainedConfig

from alise.worker.model.families.spec import DecoderSpec, LayerSpec, MoeSpec, RopeTable, WeightPaths

#: Rotary scalings whose angles depend on the position only (one table serves every sequence).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LAYER_TYPES = ("sliding_attention", "full_attention")

_GEMMA_PATHS = WeightPaths(post_attn_norm="post_attention_layernorm", pre_ffn_norm="pre_feedforward_layernorm",
                           post_ffn_norm="post_feedforward_layernorm")
_QK_NORMS = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: PretrainedConfig) -> dict[str, dict]:
    """Rotary parameters by table: ``{"default": {...}}``, or one entry per layer type where the
    config keeps them apart (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and set(params) <= set(_LAYER_TYPES) and all(isinstance(v, dict) or v is None for v in params.values()):
        return {name: dict(p or {}) for name, p in params.items()}
    return {"default": dict(params)}


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def check_rope(config: PretrainedConfig, params: dict, max_model_len: int) -> str:
    """The rope type of ``params`` if one table of angles per position computes it exactly for
    contexts up to ``max_model_len``; else ValueError saying what to do."""
    rope_type = _rope_type(params)
    if rope_type in STATIC_ROPE_TYPES:
        return rope_type
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if original is not None and max_model_len <= original:
            return rope_type
        raise ValueError(
            f"{config.model_type}: longrope rotary scaling switches every position to its long factors once a "
            f"sequence passes original_max_position_embeddings={original} tokens, which a paged KV cache shared "
            f"by sequences of different lengths cannot follow; with the short factors it is exact up to "
            f"{original} tokens: pass max_model_len <= {original} (--max-model-len {original}), got {max_model_len}")
    if "dynamic" in rope_type:
        raise ValueError(f"{config.model_type}: rope type {rope_type!r} rescales the frequencies by the batch's "
                         f"longest sequence, which a paged KV cache shared by sequences of different lengths "
                         f"cannot honour; use a config with one of {STATIC_ROPE_TYPES}")
    raise ValueError(f"{config.model_type}: rope type {rope_type!r} is not supported; supported: "
                     f"{STATIC_ROPE_TYPES + ('longrope',)}")


def _tables(config: PretrainedConfig, max_model_len: int, rotary_dim: int,
            names: list[str] | None = None) -> tuple[RopeTable, ...]:
    params = rope_parameters(config)
    chosen = names if names is not None else ["default"]
    return tuple(RopeTable(name, check_rope(config, params.get(name, {}), max_model_len), rotary_dim)
                 for name in chosen)


def _windows(config: PretrainedConfig, rule: str) -> list[int | None]:
    """Per-layer windows: ``"none"``; ``"all"`` (config.sliding_window on every layer, as
    Mistral's attention passes it); ``"layer_types"`` (on the ``sliding_attention`` layers)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if rule == "none" or window is None:
        return [None] * n
    if rule == "all":
        return [window] * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [window if t == "sliding_attention" else None for t in types[:n]]


def _decoder(config: PretrainedConfig, family: str, max_model_len: int, *, window_rule: str = "none",
             moe_layers: list[bool] | None = None, **fields) -> DecoderSpec:
    """A Llama-shaped decoder with the given departures (``fields`` of :class:`DecoderSpec`)."""
    hd = head_dim_of(config)
    fields.setdefault("rope_tables", _tables(config, max_model_len, hd))
    rope_names = [t.name for t in fields["rope_tables"]]
    moe_layers = moe_layers or [False] * config.num_hidden_layers
    layers = tuple(LayerSpec(window=w, rope=rope_names[0] if len(rope_names) == 1 else t, moe=m)
                   for w, t, m in zip(_windows(config, window_rule), getattr(config, "layer_types", None)
                                      or [None] * config.num_hidden_layers, moe_layers, strict=True))
    fields.setdefault("scale", hd ** -0.5)
    fields.setdefault("norm", "rms")
    fields.setdefault("activation", getattr(config, "hidden_act", "silu"))
    return DecoderSpec(family=family, model_type=config.model_type, hidden_size=config.hidden_size,
                       num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads or
                       config.num_attention_heads, head_dim=hd, layers=layers, **fields)


def _llama(config, max_model_len):
    return _decoder(config, "llama", max_model_len)


def _mistral(config, max_model_len):
    return _decoder(config, "mistral", max_model_len, window_rule="all")


def _qwen2(config, max_model_len):
    return _decoder(config, "qwen2", max_model_len, window_rule="layer_types")


def _qwen3(config, max_model_len):
    return _decoder(config, "qwen3", max_model_len, window_rule="layer_types", paths=WeightPaths(**_QK_NORMS))


def _phi3(config, max_model_len):
    params = rope_parameters(config)["default"]
    rotary_dim = int(head_dim_of(config) * params.get("partial_rotary_factor", 1.0))
    return _decoder(config, "phi3", max_model_len, window_rule="all",
                    rope_tables=_tables(config, max_model_len, rotary_dim),
                    paths=WeightPaths(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",),
                                      act="mlp.activation_fn"))


def _gemma(config, max_model_len, generation: int):
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{config.model_type}: use_bidirectional_attention is set: not a causal LM; "
                         f"the runner serves causal decoders only")
    fields = dict(norm="rms_unit_offset", activation=config.hidden_activation,
                  scale=config.query_pre_attn_scalar ** -0.5, final_softcap=config.final_logit_softcapping,
                  embed_scale=config.hidden_size ** 0.5)
    if generation == 2:
        return _decoder(config, "gemma2", max_model_len, window_rule="layer_types", paths=_GEMMA_PATHS,
                        attn_softcap=config.attn_logit_softcapping, **fields)
    names = sorted(set(config.layer_types))  # the tables transformers' Gemma 3 rotary module keeps
    return _decoder(config, "gemma3", max_model_len, window_rule="layer_types",
                    rope_tables=_tables(config, max_model_len, head_dim_of(config), names),
                    paths=dataclasses.replace(_GEMMA_PATHS, **_QK_NORMS), **fields)


def _mixtral(config, max_model_len):
    moe = MoeSpec(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, renormalize=True,
                  weights_in_dtype=False)
    return _decoder(config, "mixtral", max_model_len, window_rule="all", moe=moe,
                    moe_layers=[True] * config.num_hidden_layers)


def _qwen3_moe(config, max_model_len):
    moe = MoeSpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                  renormalize=bool(config.norm_topk_prob), weights_in_dtype=True)
    sparse = [i not in (config.mlp_only_layers or []) and config.num_experts > 0
              and (i + 1) % config.decoder_sparse_step == 0 for i in range(config.num_hidden_layers)]
    return _decoder(config, "qwen3_moe", max_model_len, window_rule="all", paths=WeightPaths(**_QK_NORMS), moe=moe,
                    moe_layers=sparse)


def _opt(config, max_model_len):
    hd = config.hidden_size // config.num_attention_heads
    return DecoderSpec(family="opt", model_type="opt", hidden_size=config.hidden_size,
                       num_heads=config.num_attention_heads, num_kv_heads=config.num_attention_heads, head_dim=hd,
                       norm="layer", activation=config.activation_function, scale=hd ** -0.5,
                       layers=tuple(LayerSpec(rope=None) for _ in range(config.num_hidden_layers)),
                       paths=WeightPaths(body="model.decoder", o_proj="self_attn.out_proj",
                                         input_norm="self_attn_layer_norm", pre_ffn_norm="final_layer_norm",
                                         final_norm="final_layer_norm", gate_up=("fc1",), down="fc2",
                                         act="activation_fn"))


#: config.model_type -> the function describing it.
FAMILIES: dict[str, Callable[[PretrainedConfig, int], DecoderSpec]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3,
    "gemma2": lambda c, n: _gemma(c, n, 2), "gemma3_text": lambda c, n: _gemma(c, n, 3),
    "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "opt": _opt,
}


def hf_attention(spec: DecoderSpec) -> str | None:
    """The transformers attention implementation that computes what ``spec`` says (None: its
    default). Its SDPA path drops the logit soft-cap without a word (transformers 5.17 sends
    Gemma 2 there), so soft-capped models get the eager one, which applies it."""
    return "eager" if spec.attn_softcap is not None else None


def describe(config: PretrainedConfig, max_model_len: int | None = None) -> DecoderSpec:
    """The spec of ``config`` for contexts up to ``max_model_len`` (default: the config's
    ``max_position_embeddings``); ValueError for what the runner cannot execute exactly."""
    build = FAMILIES.get(config.model_type)
    if build is None:
        hint = ("; Gemma 3 multimodal checkpoints are not served: use a text-only one (model_type "
                "'gemma3_text')" if config.model_type == "gemma3" else "")
        raise ValueError(f"unsupported model_type {config.model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}{hint}")
    return build(config, max_model_len or config.max_position_embeddings)
