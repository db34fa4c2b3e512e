"""Admission control: a bounded queue answers RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import asyncio

import pytest

from alise.client import Overloaded
from cluster_fixtures import cluster


async def test_full_queue_is_resource_exhausted_with_retry_hint(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir), num_workers=0, max_queued=2) as c, c.client() as client:
        waiting = [asyncio.create_task(client.complete(f"q{i}", max_tokens=3, ignore_eos=True))
                   for i in range(2)]
        while c.scheduler.engine.num_live_jobs() < 2:
            await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match="server busy") as info:
            await client.complete("one too many", max_tokens=3)
        assert info.value.retry_after_s == 2.0
        # The queued requests were not harmed: a worker arrives and serves them.
        await c.add_worker(str(tiny_llama_dir))
        results = await asyncio.wait_for(asyncio.gather(*waiting), 20)
        assert [len(r.token_ids) for r in results] == [3, 3]
        ok = await client.complete("room again", max_tokens=2, ignore_eos=True)
        assert len(ok.token_ids) == 2
