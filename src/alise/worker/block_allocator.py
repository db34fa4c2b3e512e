"""The worker's block allocator: which physical KV block ids are free.

All-or-nothing: ``allocate(n)`` returns ``n`` ids or ``None`` ("does not fit") and never
hands out part of a request. Freeing an id that is not allocated is a bug and raises.
"""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: the lowest ids are handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._allocated)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(num_blocks)]
        self._allocated.update(ids)
        return ids

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if block_id not in self._allocated:
                raise ValueError(f"block {block_id} is not allocated (double free?)")
            self._allocated.remove(block_id)
            self._free.append(block_id)
