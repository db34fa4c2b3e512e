"""The forward pass over a :class:`DecoderSpec`: one decoder for every family (OPT keeps its own).

``bind`` resolves the spec's weight paths in the transformers model once: Q/K/V (and gate/up)
become one fused matmul each, as views that the HF modules keep sharing, and every norm, the
embedding and the LM head stay the HF modules themselves, so the torch path computes exactly
what transformers computes. :class:`DecoderPass` is the forward of :class:`ModelRunner` (a
mixin: it reads the runner's cache, backend and :class:`LayerOps` at each call, so a test or the
planner may swap them). A layer, in the spec's terms::

    x = input_norm(h)                          (fused with the previous residual add)
    a = o_proj(attention(q/k norms, rotary of the layer's table, window, soft-cap, scale))
    a = post_attn_norm(a)                      (Gemma's sandwich only)
    h, x = h + a, pre_ffn_norm(h + a)          (one fused add + norm)
    m = down(act(gate) * up)   or   routed experts
    m = post_ffn_norm(m)                       (Gemma's sandwich only)
    h = h + m                                  (fused with the next layer's input norm)

The final norm follows the last layer; the LM head and the final soft-cap (Gemma) follow it.

Under tensor parallelism (``tp``: alise.worker.model.parallel) each rank holds its heads and its
slice of the MLP (alise.worker.model.tp_shard): the attention's and the MLP's outputs are partial
sums, all-reduced before their residual add; the embedding and the LM head are
vocabulary-parallel. With ``tp`` None (one device) none of it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alise.worker.model.attention import AttentionMetadata, paged_attention
from alise.worker.model.families.spec import DecoderSpec
from alise.worker.model.fused_weights import fuse_linears
from alise.worker.model.moe import routed_experts

#: OPT's learned position table reserves its first two rows (a fairseq legacy).
OPT_POSITION_OFFSET = 2

Linear = tuple[torch.Tensor, torch.Tensor | None]


def resolve(module: nn.Module, path: str | None):
    """The attribute at dotted ``path`` under ``module`` (None for a None path)."""
    if path is None:
        return None
    return functools.reduce(getattr, path.split("."), module)


def fused(layer: nn.Module, paths: tuple[str, ...]) -> Linear:
    """``(weight, bias)`` of the projections at ``paths`` as one matmul (see fuse_linears)."""
    linears = [resolve(layer, p) for p in paths]
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    return fuse_linears(linears)


@dataclass
class LayerWeights:
    """One decoder layer's pieces, resolved from the HF modules (None where the spec has none)."""

    qkv: Linear
    o: Linear
    input_norm: nn.Module
    pre_ffn_norm: nn.Module
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    post_attn_norm: nn.Module | None = None
    post_ffn_norm: nn.Module | None = None
    gate_up: Linear | None = None  # None on a layer of routed experts
    down: Linear | None = None
    act: nn.Module | None = None
    moe: nn.Module | None = None  # the routed block (router "gate" and "experts")


def bind(model: nn.Module, spec: DecoderSpec) -> tuple[nn.Module, list[LayerWeights]]:
    """``(body, layers)``: the decoder body module and each layer's weights."""
    p = spec.paths
    body = resolve(model, p.body)
    out = []
    for layer, layer_spec in zip(resolve(body, p.layers), spec.layers, strict=True):
        weights = LayerWeights(qkv=fused(layer, p.qkv), o=fused(layer, (p.o_proj,)),
                               input_norm=resolve(layer, p.input_norm), pre_ffn_norm=resolve(layer, p.pre_ffn_norm),
                               q_norm=resolve(layer, p.q_norm), k_norm=resolve(layer, p.k_norm),
                               post_attn_norm=resolve(layer, p.post_attn_norm),
                               post_ffn_norm=resolve(layer, p.post_ffn_norm))
        if layer_spec.moe:
            weights.moe = resolve(layer, "mlp")
        elif spec.family != "opt":
            weights.gate_up, weights.down = fused(layer, p.gate_up), fused(layer, (p.down,))
            weights.act = resolve(layer, p.act)
        out.append(weights)
    return body, out


def rope_tables(body: nn.Module, spec: DecoderSpec, max_len: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin ``[max_len, rotary_dim]`` per table of the spec, in the model dtype, from the HF
    rotary module's frequencies and attention scaling: ``rope_theta`` and the static scalings
    (linear, llama3, yarn; longrope's short factors) exactly as transformers computes them.
    The frequencies are read from ``original_inv_freq``, which transformers' forward never
    rewrites (``inv_freq`` is, by longrope past its original context)."""
    rotary = resolve(body, spec.paths.rotary) if spec.rope_tables else None
    positions = torch.arange(max_len, dtype=torch.float32, device=device)
    tables = {}
    for table in spec.rope_tables:
        prefix = "" if table.name == "default" else f"{table.name}_"
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(rotary, f"{prefix}inv_freq")
        if 2 * inv_freq.numel() != table.rotary_dim:
            raise ValueError(f"rotary table {table.name!r}: {inv_freq.numel()} frequencies for "
                             f"{table.rotary_dim} rotary dims")
        freqs = positions[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(rotary, f"{prefix}attention_scaling")
        tables[table.name] = ((angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype))
    return tables


class DecoderPass:
    """The forward passes of :class:`alise.worker.model.runner.ModelRunner` (see the module
    docstring). Set by the runner: ``spec``, ``ops``, ``kv_cache``, ``attention_backend``,
    ``model``, ``_body``, ``_weights``, ``_qkv``, ``_rope``, ``_head_dim``, ``tp`` (None: one device)."""

    tp = None

    def _forward_decoder(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Every decoder layer, then the final norm; returns ``[T, hidden]``, ready for the LM head."""
        ops, spec, layers = self.ops, self.spec, self._weights
        hidden = self._embed(resolve(self._body, spec.paths.embed), input_ids)  # Gemma's scales by sqrt(hidden)
        ropes = {name: (cos[meta.positions], sin[meta.positions]) for name, (cos, sin) in self._rope.items()}
        x = ops.add_norm(hidden, None, layers[0].input_norm)[1]
        for i, (lw, layer_spec) in enumerate(zip(layers, spec.layers, strict=True)):
            out = ops.linear(self._attend(i, x, meta, ropes.get(layer_spec.rope)), *lw.o)
            if self.tp is not None:
                out = self.tp.all_reduce(out)
            if lw.post_attn_norm is not None:
                out = ops.norm(out, lw.post_attn_norm)
            hidden, x = ops.add_norm(hidden, out, lw.pre_ffn_norm)
            out = self._mlp(lw, x)
            if self.tp is not None:
                out = self.tp.all_reduce(out)
            if lw.post_ffn_norm is not None:
                out = ops.norm(out, lw.post_ffn_norm)
            nxt = layers[i + 1].input_norm if i + 1 < len(layers) else resolve(self._body, spec.paths.final_norm)
            hidden, x = ops.add_norm(hidden, out, nxt)
        return x

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        if lw.moe is not None:
            experts = lw.moe.experts
            return routed_experts(x, lw.moe.gate.weight, experts.gate_up_proj, experts.down_proj, experts.act_fn,
                                  self.spec.moe)
        return self.ops.linear(self.ops.gated(self.ops.linear(x, *lw.gate_up), lw.act), *lw.down)

    def _forward_opt(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decoder layers of OPT (pre- or post-LN by ``do_layer_norm_before``), then its final
        norm and ``project_out``; returns ``[T, hidden]``, ready for the LM head. Each residual add
        runs fused with the norm that reads it (``LayerOps.add_norm``)."""
        decoder = self._body
        ops = self.ops
        hidden = self._embed(decoder.embed_tokens, input_ids)
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + decoder.embed_positions.weight[meta.positions + OPT_POSITION_OFFSET]
        pre_norm = self.config.do_layer_norm_before
        layers = decoder.layers
        relu = self.config.activation_function == "relu"
        x = ops.add_norm(hidden, None, layers[0].self_attn_layer_norm)[1] if pre_norm else hidden
        for layer_idx, layer in enumerate(layers):
            out = ops.linear(self._attend(layer_idx, x, meta, None), *self._weights[layer_idx].o)
            if self.tp is not None:
                out = self.tp.all_reduce(out)
            if pre_norm:
                hidden, x = ops.add_norm(hidden, out, layer.final_layer_norm)
            else:
                hidden = x = ops.add_norm(hidden, out, layer.self_attn_layer_norm)[1]
            up = ops.linear(x, layer.fc1.weight, layer.fc1.bias, relu=relu)
            if not relu:
                up = layer.activation_fn(up)
            down = ops.linear(up, layer.fc2.weight, layer.fc2.bias)
            if self.tp is not None:
                down = self.tp.all_reduce(down)
            if not pre_norm:
                hidden = x = ops.add_norm(hidden, down, layer.final_layer_norm)[1]
                continue
            last = layer_idx + 1 == len(layers)
            nxt = decoder.final_layer_norm if last else layers[layer_idx + 1].self_attn_layer_norm
            if nxt is None:  # no final norm (_remove_final_layer_norm)
                hidden = x = hidden + down
            else:
                hidden, x = ops.add_norm(hidden, down, nxt)
        if decoder.project_out is not None:
            x = decoder.project_out(x)
        return x

    def _embed(self, module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return module(input_ids) if self.tp is None else self.tp.embed(module, input_ids)

    def _attend(self, layer_idx: int, x: torch.Tensor, meta: AttentionMetadata,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Project ``x [T, hidden]`` to Q/K/V (one fused matmul), normalize the query and key
        heads and rotate them if the layer does, attend over the pages with the layer's window
        and the model's scale and soft-cap. Returns ``[T, num_heads * head_dim]``."""
        num_tokens = x.shape[0]
        lw, spec = self._weights[layer_idx], self.spec
        qkv = self.ops.linear(x, *self._qkv[layer_idx]).view(num_tokens, -1, self._head_dim)
        query, key, value = qkv.split([spec.num_heads, spec.num_kv_heads, spec.num_kv_heads], dim=1)
        if lw.q_norm is not None:
            query, key = self.ops.norm(query, lw.q_norm), self.ops.norm(key, lw.k_norm)
        key_cache, value_cache = self.kv_cache.layer(layer_idx)
        written = rope is not None
        if written:
            query, key = self.ops.rope(query, key, value, *rope, key_cache, value_cache, meta.slot_mapping,
                                       self.attention_backend.write_kv,
                                       keys_from_pages=meta.is_all_decode or meta.unified is not None)
        out = paged_attention(query, key, value, key_cache, value_cache, meta, spec.scale, self.attention_backend,
                              kv_written=written, window=spec.layers[layer_idx].window, softcap=spec.attn_softcap)
        return out.reshape(num_tokens, -1)

    def _matmuls(self, i: int) -> list[tuple[str, torch.Tensor, torch.Tensor | None, bool]]:
        """``(name, weight, bias, relu)`` of each dense matmul of decoder layer ``i``, as the
        forward runs them (routed experts are not listed)."""
        lw = self._weights[i]
        if self.spec.family == "opt":
            layer = resolve(resolve(self._body, self.spec.paths.layers), str(i))
            relu = self.config.activation_function == "relu"
            return [("qkv", *self._qkv[i], False), ("out", *lw.o, False),
                    ("fc1", layer.fc1.weight, layer.fc1.bias, relu), ("fc2", layer.fc2.weight, layer.fc2.bias, False)]
        dense = [("gate_up", *lw.gate_up, False), ("down", *lw.down, False)] if lw.gate_up is not None else []
        return [("qkv", *self._qkv[i], False), ("o", *lw.o, False), *dense]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over rows of the final hidden states (``_forward``'s output), soft-capped
        in the model dtype where the model does (Gemma); float32."""
        head = self.model.lm_head
        logits = head(hidden) if self.tp is None else self.tp.gather_logits(F.linear(hidden, head.weight, head.bias))
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _mixed_forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logit_rows: torch.Tensor,
                       out: torch.Tensor) -> None:
        """A mixed-step graph's body: the forward pass, then the LM head of ``logit_rows`` into
        ``out`` (model dtype; the graphs' shared logits buffer)."""
        hidden = self._forward(input_ids, meta).index_select(0, logit_rows)
        head = self.model.lm_head
        if self.tp is not None:
            out.copy_(self.tp.gather_logits(F.linear(hidden, head.weight, head.bias)))
        elif head.bias is None:
            torch.matmul(hidden, head.weight.t(), out=out)
        else:
            torch.addmm(head.bias, hidden, head.weight.t(), out=out)
        cap = self.spec.final_softcap
        if cap is not None:
            out.div_(cap).tanh_().mul_(cap)
