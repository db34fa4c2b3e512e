"""Fused projection weights: several linear layers as one matmul, sharing the modules' storage."""

from __future__ import annotations

import torch
from torch import nn


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``(weight, bias)`` computing all of ``linears`` at once, their outputs concatenated.

    The modules' parameters become row views of the fused tensors, so memory is not doubled and
    the HF model (which calls the modules one by one) keeps computing the same function. Already
    fused modules (adjacent views of one storage) are reused as they are.
    """
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot fuse linear layers where only some have a bias")
    fused_weight = _adjacent_rows(weights)
    fused_bias = None if biases[0] is None else _adjacent_rows(biases)
    if fused_weight is None or (biases[0] is not None and fused_bias is None):
        with torch.no_grad():
            fused_weight = torch.cat([w.detach() for w in weights])
            fused_bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        row = 0
        for lin in linears:
            rows = slice(row, row + lin.out_features)
            lin.weight = nn.Parameter(fused_weight[rows], requires_grad=False)
            if fused_bias is not None:
                lin.bias = nn.Parameter(fused_bias[rows], requires_grad=False)
            row += lin.out_features
    return fused_weight, fused_bias


def _adjacent_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one, when they already lie back to back in one storage; else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)
