"""The paged KV cache: fixed-size blocks of key/value vectors, addressed by block id.

Layout: one key tensor and one value tensor, each
``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` on the model's device, in the
model's dtype or in fp8 (:data:`KV_CACHE_DTYPES`). Token ``pos`` of a sequence lives in block
``block_table[pos // block_size]`` at offset ``pos % block_size``; its *slot* ``block_id *
block_size + offset`` indexes the flattened
``[num_blocks * block_size]`` axis of one layer. Block ids mean the same thing in every layer, so
moving, swapping or quantizing a block touches ``[:, block_id]`` of both tensors.

fp8 pages (``float8_e4m3fn``) halve the bytes of a token, so the same memory holds twice the
blocks. A value is stored as ``clamp(x, -448, 448)`` rounded to the nearest e4m3 value: the
scale is 1 for every layer and head (vLLM's default without calibration). e4m3 is a floating
format, so a scale only moves the window of exponents: K/V values of served models sit inside
it (2**-6 to 448), and on the tiny families of tests/familycases.py per-tensor and
per-(layer, head) amax scales left the logits error where scale 1 puts it (docs/fp8_kv.md).
Every reader converts the pages to the query's dtype before its arithmetic.

This class owns storage only. Which block belongs to which sequence is the engine's allocator's
business; the model runner receives block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

#: ``kv_cache_dtype`` names (vLLM's) -> the page dtype; None: the model's dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}
#: The largest finite e4m3 value: larger magnitudes are stored as it (saturation, never NaN).
FP8_MAX = 448.0


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The page dtype ``name`` (a ``KV_CACHE_DTYPES`` key) gives a model of ``model_dtype``."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name] or model_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def to_pages(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as stored in pages of ``dtype``: fp8 saturates at +-448, then rounds to nearest even."""
    if is_fp8(dtype):
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


@dataclass(frozen=True)
class KVShape:
    """Per-token KV geometry of a model: ``num_layers`` x (K and V) x ``num_kv_heads`` x ``head_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> KVShape:
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)


class KVCache:
    """Key and value pages for every layer of one model replica."""

    def __init__(self, shape: KVShape, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        dims = (shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        # Zeroed, not empty: a never-written slot is masked out of attention, but NaN garbage times a
        # zero softmax weight is still NaN.
        self.key_cache = torch.zeros(dims, dtype=dtype, device=device)
        self.value_cache = torch.zeros(dims, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    def fill_random_(self, num_layers: int | None = None) -> None:
        """Standard normal values in the pages of the first ``num_layers`` layers (None: all),
        data to time on, never zeros; fp8 has no random fill of its own, so the values are drawn
        in float16 and stored. ``zero_()`` both tensors to restore the cache's invariant."""
        for pages in (self.key_cache, self.value_cache):
            for layer in pages[:num_layers]:  # a layer at a time: the draw borrows one layer's memory
                layer.copy_(to_pages(torch.randn(layer.shape, dtype=torch.float16, device=layer.device),
                                     self.dtype))

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                    device: torch.device | str) -> KVCache:
        return cls(KVShape.from_config(config), num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                   device=device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(key, value)`` of one layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    @property
    def num_bytes(self) -> int:
        return 2 * self.key_cache.numel() * self.key_cache.element_size()

    @staticmethod
    def block_bytes(config: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block: ``block_size`` tokens of K and V across all layers."""
        shape = KVShape.from_config(config)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * itemsize

    @staticmethod
    def num_blocks_for_budget(config: PretrainedConfig, block_size: int, dtype: torch.dtype,
                              budget_bytes: int) -> int:
        """How many whole blocks fit in ``budget_bytes`` (0 when not even one does)."""
        return max(0, budget_bytes // KVCache.block_bytes(config, block_size, dtype))
