"""The vectorized selection walk takes what the one-by-one walk takes, feeding the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from alise.core.admission import Budgets, select


def walk_one_by_one(need, uncomputed, running, budgets: Budgets, backfill: bool, grow) -> tuple[list[int], list[int]]:
    """The walk as the module doc states it, one candidate at a time."""
    decode = running & (uncomputed == 1)
    budget = budgets.max_num_batched_tokens - int(decode.sum())
    if budgets.max_prefill_tokens is not None:
        budget = min(budget, budgets.max_prefill_tokens)
    taken: list[int] = []
    used = fed = 0
    reserved = 0.0
    for i in range(len(need)):
        if len(taken) == budgets.max_num_seqs:
            break
        g = 0.0 if grow is None else float(grow[i])
        limit = budgets.max_num_blocks if running[i] else budgets.max_num_blocks - reserved - g
        if used + need[i] <= limit and (running[i] or fed < budget):
            taken.append(i)
            used += int(need[i])
            fed += 0 if decode[i] else int(uncomputed[i])
            reserved += g
        elif not backfill:
            break
    fed_before, chunks = 0, []
    for i in taken:
        if decode[i]:
            chunks.append(1)
        else:
            chunks.append(int(min(max(budget - fed_before, 0), uncomputed[i])))
            fed_before += int(uncomputed[i])
    return taken, chunks


@pytest.mark.parametrize("seed", range(4))
def test_select_is_the_one_by_one_walk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(1500):
        n = int(rng.integers(0, 50))
        running = rng.random(n) < rng.random()
        uncomputed = np.where(rng.random(n) < 0.6, 1, rng.integers(2, 80, n)).astype(np.int64)
        need = rng.integers(1, 8, n).astype(np.int64)  # every job needs a block for its last token
        # Reserves in sixteenths of a block: sums of them are exact whatever their order.
        grow = None if rng.random() < 0.3 else rng.integers(0, 64, n) / 16
        budgets = Budgets(int(rng.integers(1, 40)), int(rng.integers(0, 200)), int(rng.integers(0, 150)),
                          None if rng.random() < 0.5 else int(rng.integers(0, 100)))
        backfill = bool(rng.random() < 0.6)
        positions, feed = select(need, uncomputed, running, budgets, backfill, grow)
        want = walk_one_by_one(need, uncomputed, running, budgets, backfill, grow)
        assert (positions.tolist(), feed.tolist()) == want
