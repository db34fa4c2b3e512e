"""KV block arithmetic and per-worker accounting, in block counts (never block ids).

The scheduler mirrors the worker's allocator exactly: a running job needs
``blocks_for(num_tokens)`` device blocks for its next step; a paused job keeps what its
KV place costs (``held_device_blocks``, ``held_host_blocks``). The worker owns block ids;
this module owns counts. With prefix caching a job's first ``num_shared_tokens`` are read
from shared cached blocks, counted once per worker (``alise.core.prefix_mirror``), so
these formulas count only its private tokens (``Job.num_private_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alise.core.job import Job, KvPlace
from alise.core.kv_places import PLACES

if TYPE_CHECKING:  # (the worker's config reads this module: the CLI's parser stays numpy-free)
    import numpy as np


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def blocks_for_each(num_tokens: np.ndarray, block_size: int) -> np.ndarray:
    """:func:`blocks_for` of each count (integers): a shift where the block size is a power of
    two (the same floor as the division, and cheaper)."""
    shift = block_size.bit_length() - 1
    if block_size == 1 << shift:
        return (num_tokens + (block_size - 1)) >> shift
    return (num_tokens + (block_size - 1)) // block_size


#: Blocks a quantized KV cache occupies per full-precision block, as an exact fraction
#: (numerator, denominator) of a 16-bit cache. The worker's layout (``alise.worker.model.kv_offload``)
#: packs, per layer and K/V, the codes (``bits / 8`` bytes per value) followed by an fp16 scale
#: and an fp16 zero point per group of 32 channels (4 / 32 bytes per value): 1.125 of 2 bytes
#: for int8 = 9/16, 0.625 of 2 bytes for int4 = 5/16. A 32-bit cache needs less than that and
#: leaves the slack unused, so both sides always use these fractions and agree exactly.
QUANTIZED_FRACTION = {8: (9, 16), 4: (5, 16)}



def quantized_blocks(num_full_blocks: int, bits: int) -> int:
    """Blocks that hold ``num_full_blocks`` of KV quantized to ``bits`` (rounded up)."""
    num, den = QUANTIZED_FRACTION[bits]
    return -(-num_full_blocks * num // den)


def place_blocks(place: KvPlace, num_cached_tokens: int, block_size: int) -> int:
    """Blocks (device or host, by ``place``) that ``num_cached_tokens`` of KV take in ``place``."""
    if place is KvPlace.NONE:
        return 0
    full = blocks_for(num_cached_tokens, block_size)
    bits = PLACES[place].bits
    return full if bits == 16 else quantized_blocks(full, bits)


def held_device_blocks(job: Job, block_size: int) -> int:
    """Device blocks a job holds between steps, given where its KV lives."""
    if not PLACES[job.kv].on_device:
        return 0
    return place_blocks(job.kv, job.num_private_tokens, block_size)


def held_host_blocks(job: Job, block_size: int) -> int:
    """Host blocks a job holds: its device footprint at the moment it was swapped out."""
    if not PLACES[job.kv].on_host:
        return 0
    return place_blocks(job.kv, job.num_private_tokens, block_size)


def default_token_budget(max_num_seqs: int) -> int:
    """The per-step token budget when none is set: 256, or twice the sequences if more.

    Chunked prefill feeds prompts beside the decodes within this budget. A step's matrix
    products stay bound by reading the weights (not by arithmetic) up to about 256 tokens
    for a 13B model on an H200 (26 GB of fp16 weights at ~4.2 TB/s take ~6.2 ms; 256 tokens
    of 26 GFLOP each take ~8.7 ms at ~770 TFLOP/s), so a step carrying a chunk costs little
    more than a decode step of the same batch. At least twice ``max_num_seqs``: a full
    batch of decodes still leaves half the budget to prefill."""
    return max(256, 2 * max_num_seqs)


@dataclass
class WorkerCapacity:
    """What a worker said about itself when it connected."""

    worker_id: str
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    #: Bytes of one full-precision device block (all layers, K and V); 0 = not reported.
    block_bytes: int = 0
    #: Model identity the worker serves (name and config hash), as its hello said.
    model_id: str = ""
    #: The worker caches released full blocks by content (``alise.core.prefix_cache``).
    prefix_caching: bool = False
    #: The worker's KV pages (its kv_cache_dtype): "auto" (the model's dtype) or "fp8_e4m3".
    kv_cache_dtype: str = "auto"
    #: Ranks (devices) its replica spans; the block counts above are the whole replica's.
    tensor_parallel_size: int = 1

    @property
    def can_quantize_kv(self) -> bool:
        """int8/int4 moves apply: the layout above fits ``QUANTIZED_FRACTION`` of 16-bit (or
        wider) pages; fp8 pages would need 18/16 and 10/16 of their blocks."""
        return self.kv_cache_dtype == "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "num_device_blocks", "max_model_len", "max_num_seqs",
                     "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"worker {self.worker_id}: {name} must be >= 1, got {value}")
        # A sequence can never grow past the whole cache: the worker ends it there (LENGTH).
        self.max_model_len = min(self.max_model_len, self.num_device_blocks * self.block_size)
        if self.num_host_blocks < 0:
            raise ValueError(f"worker {self.worker_id}: num_host_blocks must be >= 0")
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(f"worker {self.worker_id}: kv_cache_dtype must be auto or fp8_e4m3, "
                             f"got {self.kv_cache_dtype!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence decodes a token each step: the budget must cover them.
            raise ValueError(f"worker {self.worker_id}: max_num_batched_tokens "
                             f"({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})")
