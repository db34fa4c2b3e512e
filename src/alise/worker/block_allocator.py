"""The worker's block allocator: which physical KV block ids are free, in use or cached.

It is :class:`alise.core.prefix_cache.PrefixCache` (reference counts, content-addressed full
blocks, an LRU of cached free blocks), the class the scheduler core's mirror runs too, so the
two cannot disagree on a rule. All-or-nothing: ``allocate(n)`` returns ``n`` ids or ``None``
("does not fit") and never hands out part of a request. ``free`` drops one reference to each
id; freeing an id that is not in use is a bug and raises. An allocator nobody registers
hashes with (prefix caching off, the host pool) is a plain free list.
"""

from __future__ import annotations

from alise.core.prefix_cache import PrefixCache


class BlockAllocator(PrefixCache):
    def free(self, block_ids: list[int]) -> None:
        self.release(block_ids)
