"""KV block arithmetic and per-worker accounting, in block counts (never block ids).

The scheduler mirrors the worker's allocator exactly: a running job needs
``blocks_for(num_tokens)`` device blocks for its next step; a paused job keeps what its
KV place costs (see ``held_blocks``). The worker owns block ids; this module owns counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alise.core.job import Job, KvPlace


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


#: Device blocks a quantized job occupies per full-precision block (16-bit cache):
#: int8 halves the payload, int4 quarters it; scales and zero points ride in the slack
#: of the rounding up (see the worker's quantizer for the exact layout).
QUANTIZED_FRACTION = {KvPlace.DEVICE_INT8: 0.5, KvPlace.DEVICE_INT4: 0.25}


def held_device_blocks(job: Job, block_size: int) -> int:
    """Device blocks a job holds between steps, given where its KV lives."""
    full = blocks_for(job.num_cached_tokens, block_size)
    if job.kv is KvPlace.DEVICE:
        return full
    fraction = QUANTIZED_FRACTION.get(job.kv)
    if fraction is not None:
        return math.ceil(full * fraction)
    return 0


def held_host_blocks(job: Job, block_size: int) -> int:
    if job.kv is KvPlace.HOST:
        return blocks_for(job.num_cached_tokens, block_size)
    return 0


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

    def __post_init__(self) -> None:
        for name in ("block_size", "num_device_blocks", "max_model_len", "max_num_seqs",
                     "max_num_batched_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"worker {self.worker_id}: {name} must be >= 1, got {value}")
        if self.num_host_blocks < 0:
            raise ValueError(f"worker {self.worker_id}: num_host_blocks must be >= 0")
