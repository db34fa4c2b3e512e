"""The length estimates a burst asks for in one turn of the event loop share one Predict call
(a real predictor in-process on port 0, the scheduler's real predictor link)."""

from __future__ import annotations

import asyncio

import pytest

from alise.predictor.config import PredictorConfig
from alise.predictor.context import PromptContext
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.scheduler.estimates import LengthEstimator
from alise.scheduler.predictor_link import predictor_functions
from predictorkit import TOPICS, write_two_topics


@pytest.fixture
async def predict(tmp_path):
    path = write_two_topics(tmp_path / "tiny.jsonl.gz")
    config = PredictorConfig(address="127.0.0.1:0", model="m1", bootstrap=(str(path),))
    server = await start_predictor_server(config, encoder=Encoder(num_threads=2))
    predict, outbox = predictor_functions(f"127.0.0.1:{server.port}")
    try:
        yield predict
    finally:
        await outbox.close()
        await server.stop(0.5)


async def test_a_burst_of_estimates_is_one_predict_call_and_conversations_one_more(predict):
    calls = []

    async def counted(prompts, prompt_tokens, timeout_s, contexts=None):
        calls.append((len(prompts), contexts is not None))
        return await predict(prompts, prompt_tokens, timeout_s, contexts=contexts)

    estimator = LengthEstimator(counted, timeout_s=30.0)
    prompts = [f"{TOPICS[i % 2][0]} (new {i})" for i in range(16)]
    context = PromptContext((3, 5), "what color is the sky")
    asked = [estimator.estimate(p, 12) for p in prompts] + [estimator.estimate(prompts[0], 12, context)]
    estimates = await asyncio.gather(*asked)
    assert sorted(calls) == [(1, True), (16, False)]
    assert all(e.source != "mean" for e in estimates)
    # Each is the estimate its prompt gets alone (up to the rounding of a batched embedding).
    alone = [(await estimator.estimate(p, 12)).mean for p in prompts[:2]]
    assert [e.mean for e in estimates[:2]] == pytest.approx(alone, rel=1e-6)
    assert estimates[0].mean != estimates[1].mean
    assert estimator.state == "ok"
