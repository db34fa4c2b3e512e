"""A padding-free forward pass for BERT sentence encoders: the fast path of :class:`Encoder`.

sentence-transformers pads every batch to its longest prompt; AlpacaEval-like prompts are
mostly short with a long tail, so a padded batch of 256 can do ~9x the work of its real
tokens. Here the tokens of all prompts are *packed* into one ``(num_tokens, hidden)`` matrix:
every Linear layer (~85 % of the FLOPs) runs once on exactly the real tokens; only attention,
which needs whole sequences, gathers them into small groups of similar length
(``group_size`` prompts after sorting by length, so padding there is small), and mean pooling
is a segment sum. The result equals sentence-transformers' output to float rounding (a test
checks it).

It applies to a sentence-transformers directory whose modules are exactly Transformer (a
``BertModel``: absolute positions, exact GELU) -> mean Pooling -> optionally Normalize, which
is all-MiniLM-L6-v2 and most of its family. :meth:`PackedBert.from_sentence_transformer`
returns ``None`` for anything else, and the encoder falls back to sentence-transformers.

With ``quantize=True`` the Linear layers run in int8 (:class:`_Int8Linear`).

Inputs are token ids *with* the special tokens, already cut to the model's window; outputs
are unit vectors. Pure inference: the weights are shared, read-only views of the loaded
model, so several threads may call :meth:`embed` at once (the encoder shards big batches
that way).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Prompts per attention group (sorted by length, so they are of similar length).
DEFAULT_GROUP_SIZE = 16


@dataclass(frozen=True)
class _Layer:
    qkv: Callable[[torch.Tensor], torch.Tensor]  # query, key and value fused
    out: Callable[[torch.Tensor], torch.Tensor]
    attn_norm: tuple[torch.Tensor, torch.Tensor, float]
    ffn_in: Callable[[torch.Tensor], torch.Tensor]
    ffn_out: Callable[[torch.Tensor], torch.Tensor]
    ffn_norm: tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class _Group:
    """One attention group: ``num_seqs`` packed sequences padded to ``max_len``."""

    first_token: int  # the group's tokens are contiguous in the packed matrix
    num_tokens: int
    gather: torch.Tensor  # (num_seqs, max_len) packed row of each padded slot
    valid_slots: torch.Tensor | None  # flat indices of real slots; None when no padding
    mask: torch.Tensor | None  # additive key mask (num_seqs, 1, 1, max_len); None: no padding
    num_seqs: int
    max_len: int


class _Int8Linear:
    """``x -> x @ weight.T + bias`` with int8 weights (per output channel) and int8
    activations scaled *per token*, so a prompt's vector does not depend on its batch-mates.

    fbgemm's dynamic quantized linear scales activations per *tensor*: in a packed batch one
    prompt's outliers would coarsen every other prompt's quantization (measured: a prompt alone
    vs in a batch of 256, cosine 0.95-0.99, which breaks exact-duplicate matching). So each
    row is divided by its own absolute maximum first, and one anchor row ``[1, -1, 0, ...]``
    pins the tensor's range to exactly [-1, 1]: the per-tensor scale is then the same for every
    batch, the per-row scale is multiplied back after the int8 GEMM.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with warnings.catch_warnings():  # torch.ao's deprecation notices; the kernels remain
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig

            dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            dense.weight.data = weight
            dense.qconfig = per_channel_dynamic_qconfig
            self._gemm = DynamicLinear.from_float(dense)
        self._bias = bias
        self._anchor = torch.zeros(1, weight.shape[1])
        self._anchor[0, 0], self._anchor[0, 1] = 1.0, -1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
        rows = torch.empty(len(x) + 1, x.shape[1])
        torch.div(x, scale, out=rows[:-1])
        rows[-1:] = self._anchor
        return torch.addcmul(self._bias, self._gemm(rows)[:-1], scale)


def _linear(weight: torch.Tensor, bias: torch.Tensor, quantize: bool):
    """``x -> x @ weight.T + bias``, fp32 or :class:`_Int8Linear`."""
    weight, bias = weight.detach().contiguous(), bias.detach().contiguous()
    if quantize:
        return _Int8Linear(weight, bias)
    return functools.partial(F.linear, weight=weight, bias=bias)


def _norm(module) -> tuple[torch.Tensor, torch.Tensor, float]:
    return module.weight.detach(), module.bias.detach(), float(module.eps)


def _plan_groups(lengths: list[int], group_size: int) -> list[_Group]:
    """Groups consecutive (length-sorted) sequences; their tokens are consecutive too."""
    groups, start = [], 0
    for g in range(0, len(lengths), group_size):
        lens = torch.tensor(lengths[g:g + group_size])
        max_len, num_seqs = int(lens.max()), len(lens)
        starts = start + torch.cumsum(lens, 0) - lens
        slots = torch.arange(max_len)[None, :]
        valid = slots < lens[:, None]
        gather = torch.where(valid, starts[:, None] + slots, start)
        num_tokens = int(lens.sum())
        if num_tokens == num_seqs * max_len:
            valid_slots = mask = None
        else:
            valid_slots = valid.flatten().nonzero().squeeze(1)
            mask = torch.zeros(num_seqs, 1, 1, max_len).masked_fill(
                ~valid[:, None, None, :], float("-inf"))
        groups.append(_Group(start, num_tokens, gather, valid_slots, mask, num_seqs, max_len))
        start += num_tokens
    return groups


class PackedBert:
    """Mean-pooled, normalized BERT sentence embeddings without padding."""

    def __init__(self, bert, *, group_size: int = DEFAULT_GROUP_SIZE, quantize: bool = False) -> None:
        cfg = bert.config
        emb = bert.embeddings
        self.hidden = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.group_size = group_size
        self._word = emb.word_embeddings.weight.detach()
        self._position = emb.position_embeddings.weight.detach()
        self._token_type = emb.token_type_embeddings.weight.detach()[0]
        self._emb_norm = _norm(emb.LayerNorm)
        self._layers = []
        for layer in bert.encoder.layer:
            att = layer.attention
            q, k, v = att.self.query, att.self.key, att.self.value
            self._layers.append(_Layer(
                _linear(torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias]),
                        quantize),
                _linear(att.output.dense.weight, att.output.dense.bias, quantize),
                _norm(att.output.LayerNorm),
                _linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias, quantize),
                _linear(layer.output.dense.weight, layer.output.dense.bias, quantize),
                _norm(layer.output.LayerNorm),
            ))

    @classmethod
    def from_sentence_transformer(cls, model, **kwargs) -> "PackedBert | None":
        """The fast path for a loaded ``SentenceTransformer``, or None where it does not apply."""
        modules = list(model)
        kinds = [type(m).__name__ for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        pooling = modules[1].get_config_dict()
        if pooling.get("pooling_mode") != "mean" or not pooling.get("include_prompt", True):
            return None
        bert = getattr(modules[0], "auto_model", None)
        cfg = getattr(bert, "config", None)
        if (type(bert).__name__ != "BertModel" or getattr(cfg, "model_type", None) != "bert"
                or getattr(cfg, "hidden_act", None) != "gelu"
                or getattr(cfg, "position_embedding_type", "absolute") != "absolute"):
            return None
        return cls(bert, **kwargs)

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors ``(n, hidden)`` float32 for ``token_ids`` (with special tokens)."""
        n = len(token_ids)
        if n == 0:
            return np.zeros((0, self.hidden), np.float32)
        order = sorted(range(n), key=lambda i: len(token_ids[i]))
        lengths = [len(token_ids[i]) for i in order]
        if min(lengths) < 1 or max(lengths) > len(self._position):
            raise ValueError(f"token sequences must have 1..{len(self._position)} tokens")
        flat = torch.tensor([t for i in order for t in token_ids[i]], dtype=torch.long)
        positions = torch.cat([torch.arange(length) for length in lengths])
        x = self._word[flat] + self._position[positions] + self._token_type
        x = F.layer_norm(x, (self.hidden,), *self._emb_norm)
        groups = _plan_groups(lengths, self.group_size)
        for layer in self._layers:
            x = self._layer(x, layer, groups)
        seq = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
        sums = torch.zeros(n, self.hidden).index_add_(0, seq, x)
        vectors = F.normalize(sums / torch.tensor(lengths, dtype=x.dtype)[:, None], dim=-1)
        out = torch.empty_like(vectors)
        out[torch.tensor(order)] = vectors
        return out.numpy()

    def _layer(self, x: torch.Tensor, layer: _Layer, groups: list[_Group]) -> torch.Tensor:
        qkv = layer.qkv(x)
        context = torch.empty_like(x)
        heads, head_dim = self.num_heads, self.hidden // self.num_heads
        for g in groups:
            q, k, v = qkv[g.gather].view(g.num_seqs, g.max_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
            att = att.transpose(1, 2).reshape(g.num_seqs * g.max_len, self.hidden)
            if g.valid_slots is not None:
                att = att.index_select(0, g.valid_slots)
            context[g.first_token:g.first_token + g.num_tokens] = att
        x = F.layer_norm(layer.out(context) + x, (self.hidden,), *layer.attn_norm)
        h = F.gelu(layer.ffn_in(x))
        return F.layer_norm(layer.ffn_out(h) + x, (self.hidden,), *layer.ffn_norm)
