"""Whole blocks of many counts at once are the blocks of each count."""

from __future__ import annotations

import numpy as np
import pytest

from alise.core.blocks import blocks_for, blocks_for_each


@pytest.mark.parametrize("block_size", [1, 2, 16, 24, 32, 100])
def test_blocks_for_each_is_blocks_for(block_size: int) -> None:
    counts = np.array([0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size, 12345, -1, -block_size - 1])
    assert blocks_for_each(counts, block_size).tolist() == [blocks_for(int(n), block_size) for n in counts]
