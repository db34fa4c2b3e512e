"""A worker with overlapped steps (``async_steps``) through the real services: a streamed request
gets the tokens the synchronous worker gives it, and its steps were launched ahead of the
step before them, their decodes' ids taken on the device."""

from __future__ import annotations

import asyncio

from cluster_fixtures import cluster

PROMPT = " ".join(f"word{i}" for i in range(30))


async def stream_tokens(async_steps: bool, tiny_llama_dir) -> tuple[list[int], str, int]:
    """The seeded request's streamed tokens and finish reason (a greedy one beside it), and how
    many steps were launched behind another."""
    async with cluster(str(tiny_llama_dir), worker_overrides=dict(
            async_steps=async_steps, max_num_seqs=4, max_num_batched_tokens=16)) as c, c.client() as client:
        engine = c.workers[0][0].engine
        launch, behind = engine.launch, []

        def spy(plan, previous=None):
            behind.append(previous is not None and previous.handle is not None)
            return launch(plan, previous)
        engine.launch = spy

        async def streamed():
            chunks = [ch async for ch in client.generate(PROMPT, max_tokens=24, temperature=0.9, top_p=0.95,
                                                         seed=11, ignore_eos=True)]
            return [t for ch in chunks for t in ch.token_ids], chunks[-1].finish_reason
        (tokens, reason), _ = await asyncio.gather(
            streamed(), client.complete("a short one", max_tokens=20, temperature=0.0, ignore_eos=True))
        return tokens, reason, sum(behind)


async def test_a_streamed_request_gets_the_synchronous_tokens_with_async_steps(tiny_llama_dir):
    sync_tokens, sync_reason, _ = await stream_tokens(False, tiny_llama_dir)
    tokens, reason, num_behind = await stream_tokens(True, tiny_llama_dir)
    assert len(sync_tokens) == 24 and sync_reason == "length"
    assert (tokens, reason) == (sync_tokens, sync_reason)
    assert num_behind >= 5  # plans were queued, so steps overlapped
