"""What a decoder computes, as data: one frozen :class:`DecoderSpec` per model, built from its
config by :mod:`alise.worker.model.families.describe`, run by the one forward pass of
:mod:`alise.worker.model.decoder`.

The decoders served here share one shape (pre-norm residual blocks of attention and a gated
MLP); what differs between families is a handful of choices, each a field below:

- the norm (``rms``: Llama's RMSNorm, the weight multiplying the normalized row rounded to the
  dtype; ``rms_unit_offset``: Gemma's, ``(1 + weight)`` multiplying in float32 before rounding;
  ``layer``: LayerNorm) and where norms sit: Gemma's "sandwich" adds a norm on the attention's
  and on the MLP's output before each residual add;
- attention: a bias on the Q/K/V projections (Qwen2; just a bias on the fused projection), an
  RMSNorm over each query and key head before the rotary (Qwen3, Gemma 3), the logits' scale
  (``query_pre_attn_scalar ** -0.5`` for Gemma), a soft-cap on the logits (Gemma 2), a sliding
  window per layer (Mistral, Phi-3, Qwen2/3 where configured, Gemma's local layers), and the
  rotary table per layer (Gemma 3's local layers use another base than its global ones);
- the MLP: the gated activation (SiLU, GELU-tanh), or top-k routed experts (Mixtral, Qwen3-MoE);
- the LM head: a soft-cap on the final logits (Gemma 2).

``paths`` says where each weight lives in the Hugging Face module tree, so the runner reuses the
transformers model's own parameters (a checkpoint loads the usual way) and a family whose
checkpoint already fuses Q/K/V or gate/up (Phi-3) names one module instead of several.
"""

from __future__ import annotations

from dataclasses import dataclass

NORM_KINDS = ("layer", "rms", "rms_unit_offset")


@dataclass(frozen=True)
class RopeTable:
    """One table of rotary angles. ``name`` is ``"default"``, or the layer type whose angles the
    HF rotary module keeps apart (Gemma 3: ``"sliding_attention"``, ``"full_attention"``)."""

    name: str
    rope_type: str
    rotary_dim: int  # leading dims of each head that rotate (head_dim unless partial)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its attention window (keys in ``(p - window, p]``; None: all of
    ``[0, p]``), its rotary table (None: no rotary, OPT) and whether its MLP is routed experts."""

    window: int | None = None
    rope: str | None = "default"
    moe: bool = False


@dataclass(frozen=True)
class MoeSpec:
    """Top-k routed experts: softmax over ``num_experts`` router logits (float32), the ``top_k``
    largest kept and, with ``renormalize``, divided by their sum; with ``weights_in_dtype`` the
    weights are rounded to the model dtype before they scale the experts' outputs (Qwen3-MoE),
    else the product is (Mixtral). Each expert is a gated MLP with fused gate/up weights."""

    num_experts: int
    top_k: int
    renormalize: bool
    weights_in_dtype: bool
    router: str = "mlp.gate"
    experts: str = "mlp.experts"


@dataclass(frozen=True)
class WeightPaths:
    """Dotted attribute paths into the HF model. ``body`` from the model root; ``embed``,
    ``layers``, ``final_norm``, ``rotary`` from the body; ``lm_head`` from the root; the rest
    from each decoder layer. ``qkv`` and ``gate_up`` list the projections whose outputs are
    concatenated (one entry: the checkpoint fuses them already). Optional norms are None where
    the family has none."""

    body: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    lm_head: str = "lm_head"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    input_norm: str = "input_layernorm"
    post_attn_norm: str | None = None  # on the attention's output (Gemma's sandwich)
    pre_ffn_norm: str = "post_attention_layernorm"  # Llama's name for the MLP's input norm
    post_ffn_norm: str | None = None  # on the MLP's output (Gemma's sandwich)
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"


@dataclass(frozen=True)
class DecoderSpec:
    """A whole decoder (see the module docstring). ``scale`` multiplies the attention logits;
    ``embed_scale`` is what the embedding module multiplies by (Gemma: ``sqrt(hidden)``, applied
    by the module itself, which the forward calls); ``activation`` names the gated MLP's
    activation as the config does (``silu``, ``gelu_pytorch_tanh``, ...)."""

    family: str
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str
    activation: str
    scale: float
    layers: tuple[LayerSpec, ...]
    rope_tables: tuple[RopeTable, ...] = ()
    paths: WeightPaths = WeightPaths()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    moe: MoeSpec | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not split into {self.num_kv_heads} KV heads")
        tables = {t.name for t in self.rope_tables}
        if any(layer.rope is not None and layer.rope not in tables for layer in self.layers):
            raise ValueError(f"a layer names a rotary table outside {sorted(tables)}")
        if any(layer.moe for layer in self.layers) and self.moe is None:
            raise ValueError("a layer has routed experts but the spec has no MoeSpec")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def has_moe(self) -> bool:
        return any(layer.moe for layer in self.layers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(layer.window for layer in self.layers)
