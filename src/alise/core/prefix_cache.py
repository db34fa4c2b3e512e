"""Automatic prefix caching: content-addressed KV blocks, shared read-only, kept until evicted.

One class, :class:`PrefixCache`, holds the block ids of one device. It is the worker's block
allocator (``alise.worker.block_allocator``) and, fed the same operations in the same order
with ids of its own, the scheduler core's mirror of that allocator (``alise.core.prefix_mirror``).

The model
---------
A *full* block's content is named by a chain hash (:func:`chain_hashes`): the hash of the
block's tokens together with the hash of the block before it, so one name means one whole
prefix (the same tokens after a different prefix have other K/V, and another name). Every
block id is in exactly one of three states:

* free, uncached   on the free list, content meaningless;
* in use           referenced by ``refs >= 1`` sequences; a cached (hashed) block in use is
                   shared read-only by every sequence that references it; an uncached one is
                   one sequence's private block;
* free, cached     no reference, its hash kept: a later sequence that starts with the same
                   prefix takes it back (:meth:`acquire`); kept in an LRU order.

Invariants (``tests/unit/test_prefix_cache.py`` checks them over random operations):

* a block in use is never handed out by :meth:`allocate` and never changes its hash: nothing
  writes into a block another sequence reads;
* :meth:`allocate` takes uncached free blocks first (lowest ids first), then evicts cached free
  blocks, least recently released first: the cache only ever costs memory nobody needs;
* one hash names at most one block (:meth:`register` of a hash already held keeps the block
  uncached: a duplicate is never a second name);
* ``num_free + num_used == num_blocks`` at every moment: nothing leaks.

A sequence releases its blocks in reverse order, so a released sequence's last block is the
first evicted: evicting a block from the middle of a prefix would leave the blocks after it
unreachable (a lookup stops at the first missing hash).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

#: A block's chain hash (16 bytes of BLAKE2b): the name of its content and its whole prefix.
BlockHash = bytes


def chain_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int | None = None) -> list[BlockHash]:
    """Hashes of the first ``num_blocks`` full blocks of ``token_ids`` (default: every full one):
    block i's hash covers its tokens and block i - 1's hash. Deterministic across processes
    (the scheduler and its workers compute the same names)."""
    full = len(token_ids) // block_size
    count = full if num_blocks is None else min(num_blocks, full)
    hashes: list[BlockHash] = []
    parent = b""
    for i in range(count):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        hashes.append(parent)
    return hashes


def reusable_tokens(num_computed: int, num_known: int, finished: bool) -> int:
    """Tokens of a released sequence whose full blocks may be cached: what it computed, but of
    a sequence that did not finish only the tokens the scheduler knew the values of when it
    planned the release (tokens generated since may still be in flight to it): its admitted
    tokens, or for a drop the count the drop carries (``Pause.num_reusable_tokens``). Both the
    worker and the scheduler's mirror release by this rule, so they cache the same blocks.

    NOTE: ``num_computed`` of a drop is what the worker has computed when it applies the drop,
    after the plans ahead of it: every known token but the last, unless that one was fed too;
    the mirror's projected count is the same number."""
    return num_computed if finished else min(num_computed, num_known)


class PrefixCache:
    """Block ids of one device: free, in use (reference-counted), or free and cached (LRU)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: the lowest ids are handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}
        #: Cached free blocks, least recently released first: hash -> block id.
        self._lru: OrderedDict[BlockHash, int] = OrderedDict()
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        #: Cached blocks taken back by :meth:`acquire` and evicted by :meth:`allocate`, ever.
        self.num_hits = 0
        self.num_evictions = 0
        self._num_shared_in_use = 0

    # ----------------------------------------------------------------- counts

    @property
    def num_free(self) -> int:
        """Blocks :meth:`allocate` can hand out: uncached free ones and cached free ones."""
        return len(self._free) + len(self._lru)

    @property
    def num_uncached_free(self) -> int:
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_shared_in_use(self) -> int:
        """Cached blocks in use: read by one or more sequences, counted once."""
        return self._num_shared_in_use

    def refs(self, block_id: int) -> int:
        return self._refs.get(block_id, 0)

    def hash_of(self, block_id: int) -> BlockHash | None:
        return self._hash_of.get(block_id)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    # ----------------------------------------------------------------- lookups

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Ids of the longest prefix of ``hashes`` that is cached (in use or free); changes nothing."""
        ids = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            ids.append(block)
        return ids

    def num_matched_in_use(self, hashes: Sequence[BlockHash]) -> tuple[int, int]:
        """(blocks of the longest cached prefix of ``hashes``, those of them in use)."""
        ids = self.match(hashes)
        return len(ids), sum(1 for b in ids if b in self._refs)

    # ----------------------------------------------------------------- changes

    def allocate(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` private blocks (each referenced once), or None when fewer are free;
        evicts cached free blocks (least recently released first) only past the uncached ones."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_free:
            return None
        ids = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.pop()
            else:
                h, block = self._lru.popitem(last=False)
                del self._by_hash[h], self._hash_of[block]
                self.num_evictions += 1
            self._refs[block] = 1
            ids.append(block)
        return ids

    def acquire(self, block_ids: Sequence[int]) -> None:
        """One more reference to each cached block (a sequence starts with its prefix)."""
        for block in block_ids:
            h = self._hash_of.get(block)
            if h is None:
                raise ValueError(f"block {block} is not cached: it cannot be shared")
            if block in self._refs:
                self._refs[block] += 1
            else:
                del self._lru[h]
                self._refs[block] = 1
                self._num_shared_in_use += 1
            self.num_hits += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """One reference fewer to each block, last first; a block nobody references goes to the
        LRU if cached, else to the free list. Releasing a block not in use is a bug and raises
        (checked for every id before any changes)."""
        for block in block_ids:
            if block not in self._refs:
                raise ValueError(f"block {block} is not allocated (double free?)")
        for block in reversed(block_ids):
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            h = self._hash_of.get(block)
            if h is None:
                self._free.append(block)
            else:
                self._lru[h] = block
                self._num_shared_in_use -= 1

    def register(self, block_ids: Sequence[int], hashes: Sequence[BlockHash]) -> int:
        """Names the in-use blocks ``block_ids`` (a sequence's leading full blocks) by ``hashes``,
        in order, and returns how many now carry their hash. Stops at the first block whose hash
        another block already carries (that block keeps the name; this one stays uncached, so
        the names stay one prefix chain)."""
        count = 0
        for block, h in zip(block_ids, hashes, strict=False):  # a partial last block has no hash
            if block not in self._refs:
                raise ValueError(f"block {block} is not in use: only a computed block can be cached")
            held = self._by_hash.get(h)
            if held == block:
                count += 1
                continue
            if held is not None or block in self._hash_of:
                break
            self._by_hash[h] = block
            self._hash_of[block] = h
            self._num_shared_in_use += 1
            count += 1
        return count

    def forget(self, hashes: Sequence[BlockHash]) -> None:
        """Drops these names where no sequence reads the block (a cached free block goes back to
        the free list); a block in use keeps its name: its readers count on it."""
        for h in hashes:
            block = self._lru.pop(h, None)
            if block is not None:
                del self._by_hash[h], self._hash_of[block]
                self._free.append(block)

    def check(self) -> None:
        """Asserts the invariants of the module doc (tests)."""
        free, lru, used = set(self._free), set(self._lru.values()), set(self._refs)
        assert len(free) == len(self._free), "a block twice on the free list"
        assert not (free & lru) and not (free & used) and not (lru & used), "a block in two states"
        assert free | lru | used == set(range(self.num_blocks)), "a block leaked"
        assert all(r >= 1 for r in self._refs.values())
        assert {b: h for h, b in self._by_hash.items()} == self._hash_of
        assert all(self._by_hash[h] == b for h, b in self._lru.items())
        assert not (free & set(self._hash_of)), "an uncached free block with a name"
        assert self._num_shared_in_use == sum(1 for b in self._refs if b in self._hash_of)
