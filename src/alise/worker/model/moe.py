"""Top-k routed experts (Mixtral, Qwen3-MoE) over a step's flattened tokens.

Each token's router logits go through a float32 softmax; its ``top_k`` experts are kept (their
weights renormalized to sum to one where the model says so). Tokens are then grouped by expert
(one stable sort), and each expert that got any runs one gated-MLP matmul pair over its tokens;
outputs are weighted and summed back per token in expert order, as transformers does.

The group sizes are read back to the host once per layer, so a step with routed experts runs
eagerly: it cannot be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from alise.worker.model.families.spec import MoeSpec


def route(x: torch.Tensor, router_weight: torch.Tensor, spec: MoeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], experts [T, k])`` of each token's chosen experts."""
    probs = torch.softmax(F.linear(x, router_weight), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, spec.top_k, dim=-1)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_dtype:
        weights = weights.to(x.dtype)
    return weights, experts


def routed_experts(x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor], spec: MoeSpec) -> torch.Tensor:
    """The routed MLP of ``x [T, hidden]``: ``gate_up [E, 2 * I, hidden]`` (gate rows first) and
    ``down [E, hidden, I]`` per expert. Returns ``[T, hidden]`` in ``x``'s dtype."""
    weights, experts = route(x, router_weight, spec)
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.num_experts).tolist()  # the one host read-back
    tokens = order // spec.top_k
    sorted_weights = weights.flatten().index_select(0, order)
    out = torch.zeros_like(x)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows = tokens[start:start + n]
            gate, up = F.linear(x.index_select(0, rows), gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(act(gate) * up, down[expert]) * sorted_weights[start:start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
        start += n
    return out
