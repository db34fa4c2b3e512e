"""The content-addressed block pool (``alise.core.prefix_cache``): hash chain, sharing,
reference counts, LRU eviction, and its invariants over random operations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.core.prefix_cache import PrefixCache, chain_hashes, reusable_tokens
from alise.worker.block_allocator import BlockAllocator

BS = 4


def test_chain_hash_names_the_whole_prefix():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert len(a) == 2  # the partial third block has no name
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS) == a
    assert chain_hashes([1, 2, 3, 4], BS) == a[:1]
    # Same tokens in block 1 after another block 0: another name.
    b = chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert b[0] != a[0] and b[1] != a[1]
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, num_blocks=1) == a[:1]
    assert len(a[0]) == 16


def cached_sequence(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Allocates and names the blocks of ``tokens`` as a sequence that computed them would."""
    ids = cache.allocate(len(tokens) // BS)
    assert cache.register(ids, chain_hashes(tokens, BS)) == len(ids)
    return ids


def test_a_released_prefix_is_found_shared_and_counted_once():
    cache = PrefixCache(8)
    tokens = list(range(12))
    ids = cached_sequence(cache, tokens)
    assert cache.match(chain_hashes(tokens + [99] * 4, BS)) == ids
    cache.acquire(ids)  # a second sequence reads the same three blocks
    assert [cache.refs(b) for b in ids] == [2, 2, 2]
    assert cache.num_used == 3 and cache.num_shared_in_use == 3 and cache.num_free == 5
    cache.release(ids)
    assert cache.num_used == 3  # still read by the other one
    cache.release(ids)
    assert cache.num_used == 0 and cache.num_cached_free == 3 and cache.num_free == 8
    assert cache.match(chain_hashes(tokens, BS)) == ids  # kept until evicted
    cache.acquire(ids[:2])
    assert cache.num_cached_free == 1 and cache.num_hits == 5
    cache.check()


def test_a_lookup_stops_at_the_first_missing_block():
    cache = PrefixCache(8)
    ids = cached_sequence(cache, list(range(12)))
    cache.release(ids)
    cache.forget(chain_hashes(list(range(12)), BS)[1:2])
    assert cache.match(chain_hashes(list(range(12)), BS)) == ids[:1]
    assert cache.num_cached_free == 2 and cache.num_uncached_free == 6
    cache.check()


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_released():
    cache = PrefixCache(6)
    first = cached_sequence(cache, list(range(8)))          # blocks 0, 1
    second = cached_sequence(cache, list(range(100, 108)))  # blocks 2, 3
    cache.release(first)
    cache.release(second)
    assert cache.allocate(2) == [4, 5]  # the uncached ones, no eviction
    assert cache.num_evictions == 0
    # Then the oldest release, last block first: first's tail (1), then its head (0).
    assert cache.allocate(1) == [first[1]]
    assert cache.match(chain_hashes(list(range(8)), BS)) == first[:1]
    assert cache.allocate(1) == [first[0]]
    assert cache.match(chain_hashes(list(range(100, 108)), BS)) == second
    assert cache.num_evictions == 2
    assert cache.allocate(3) is None  # all or nothing
    cache.check()


def test_a_block_in_use_is_never_evicted_nor_renamed():
    cache = PrefixCache(3)
    ids = cached_sequence(cache, list(range(8)))
    other = cache.allocate(1)
    assert cache.allocate(1) is None  # the cached blocks are read: not free
    # Same content computed again by another sequence: the name stays with the first block.
    assert cache.register(other, chain_hashes(list(range(4)), BS)) == 0
    assert cache.hash_of(other[0]) is None
    cache.release(other)
    assert cache.num_uncached_free == 1 and cache.match(chain_hashes(list(range(8)), BS)) == ids
    cache.check()


def test_misuse_raises_and_changes_nothing():
    cache = BlockAllocator(4)
    ids = cache.allocate(2)
    with pytest.raises(ValueError, match="double free"):
        cache.free([ids[0], 3])
    assert cache.num_used == 2
    with pytest.raises(ValueError, match="not cached"):
        cache.acquire(ids[:1])
    cache.free(ids)
    with pytest.raises(ValueError, match="not in use"):
        cache.register(ids, chain_hashes(list(range(8)), BS))
    with pytest.raises(ValueError, match="num_blocks"):
        PrefixCache(0)
    cache.check()


def test_reusable_tokens():
    assert reusable_tokens(40, 30, finished=True) == 40
    assert reusable_tokens(40, 30, finished=False) == 30
    assert reusable_tokens(20, 30, finished=False) == 20


#: Prompts over a small alphabet of blocks, so random sequences share prefixes often.
_prompts = st.lists(st.integers(0, 2), min_size=1, max_size=5).map(
    lambda blocks: [t for b in blocks for t in [b] * BS])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "grow", "finish", "forget"]), _prompts,
                          st.integers(0, 7)), min_size=200, max_size=500))
def test_random_operations_keep_every_invariant(ops):
    """Sequences start on their cached prefix, grow private blocks, finish (naming their
    blocks); at every step no block is in two states, none leaks, and a block some
    sequence reads keeps its hash and is never handed out again."""
    cache = PrefixCache(12)
    seqs: dict[int, tuple[list[int], list[int]]] = {}
    for i, (op, tokens, k) in enumerate(ops):
        if op == "start":
            hashes = chain_hashes(tokens, BS)
            hit = cache.match(hashes)
            cache.acquire(hit)  # before allocating: the allocation must not evict the hit
            rest = cache.allocate(len(hashes) - len(hit))
            if rest is None:
                cache.release(hit)
            else:
                seqs[i] = (hit + rest, tokens)
        elif op == "grow" and seqs:
            key = sorted(seqs)[k % len(seqs)]
            more = cache.allocate(1)
            if more is not None:
                ids, toks = seqs[key]
                seqs[key] = (ids + more, toks + [k] * BS)
        elif op == "finish" and seqs:
            ids, toks = seqs.pop(sorted(seqs)[k % len(seqs)])
            cache.register(ids, chain_hashes(toks, BS))
            cache.release(ids)
        elif op == "forget":
            cache.forget(chain_hashes(tokens, BS))
        cache.check()
        read = {b for ids, _ in seqs.values() for b in ids}
        assert cache.num_used == len(read)
        for ids, toks in seqs.values():
            for b, h in zip(ids, chain_hashes(toks, BS), strict=False):  # a partial last block has no hash
                assert cache.hash_of(b) in (None, h)  # a read block never changes name
    for ids, _ in seqs.values():
        cache.release(ids)
    assert cache.num_free == cache.num_blocks and cache.num_used == 0
    cache.check()
