"""Prefix caching through the real services: a request whose prompt starts with an earlier
one's computes only the rest on the worker, with the tokens it would have had without it."""

from __future__ import annotations

import pytest
from cluster_fixtures import cluster

PROMPT = list(range(1000, 1100))  # 100 tokens: six full blocks of 16


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_repeated_prompt_reads_its_cached_blocks(tiny_llama_dir, enabled):
    async with cluster(str(tiny_llama_dir), worker_overrides={"enable_prefix_caching": enabled}) as c, \
            c.client() as client:
        first = await client.complete(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
        second = await client.complete(PROMPT + [7, 8, 9], max_tokens=6, temperature=0, ignore_eos=True)
        again = await client.complete(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
        engine = c.workers[0][0].engine
        core = c.scheduler.engine.core
    assert first.token_ids == again.token_ids
    assert len(second.token_ids) == 6
    if enabled:
        # The second and third requests each read the six full blocks of the prompt.
        assert engine.allocator.num_hits >= 12
        assert core.prefill.num_cached_tokens >= 2 * 96
    else:
        assert engine.allocator.num_hits == 0 and core.prefill.num_cached_tokens == 0
    assert core.prefill.num_admitted_tokens == 100 + 103 + 100
