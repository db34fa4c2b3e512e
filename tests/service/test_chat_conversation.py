"""A chat's conversation reaches the length predictor: the HTTP door fills the request's query
(the latest user message) and the earlier answers' lengths (in the served model's tokens), and
the scheduler passes them to a real predictor; a completion passes none."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from cluster_fixtures import InProcessCluster

from alise.client import AsyncClient, Conversation, InvalidRequest
from alise.http.config import HttpConfig
from alise.http.server import start_http
from alise.modelinfo.source import resolve_model
from alise.modelinfo.tokenizer import load_tokenizer
from alise.predictor.config import PredictorConfig
from alise.predictor.context import PromptContext
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.predictor_link import predictor_functions
from alise.scheduler.service import start_scheduler

ANSWER = "The Nile is the longest river in Africa, at about 6,650 kilometres."


@pytest.fixture()
async def served(tmp_path):
    """(door base URL, scheduler address, what the predictor was asked: (prompts, contexts))."""
    predictor = await start_predictor_server(PredictorConfig(address="127.0.0.1:0", model="m1"),
                                             encoder=Encoder(num_threads=1))
    asked: list[tuple[list[str], list[PromptContext] | None]] = []
    predict_for_real = predictor.runtime.predict

    async def recording(prompts, contexts=None):
        asked.append((list(prompts), contexts))
        return await predict_for_real(prompts, contexts)

    predictor.runtime.predict = recording
    predict, observe = predictor_functions(f"127.0.0.1:{predictor.port}")
    scheduler = await start_scheduler(
        SchedulerConfig(address="127.0.0.1:0", model="tiny-llama", max_model_len=256, predictor_timeout_s=30),
        predict=predict, observe=observe)
    cluster = InProcessCluster(scheduler, f"127.0.0.1:{scheduler.port}", f"127.0.0.1:{scheduler.worker_port}")
    await cluster.add_worker("tiny-llama", max_model_len=256, block_size=8)
    http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=cluster.address))
    try:
        yield http.base_url, cluster.address, asked
    finally:
        await http.stop(0.5)
        await cluster.close()
        await predictor.stop(0.5)


async def asked_for(asked: list, found, timeout_s: float = 30.0):
    """The first (prompts, contexts) the predictor was asked that ``found`` accepts."""
    for _ in range(int(timeout_s / 0.05)):
        hits = [a for a in asked if found(*a)]
        if hits:
            return hits[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the predictor was not asked; it was asked {asked}")


async def test_a_chats_earlier_turns_reach_the_predictor_and_a_completion_sends_none(served):
    base_url, _, asked = served
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Which is the longest river in Africa?"},
                {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": "And in Europe?"}]
    async with httpx.AsyncClient(timeout=60) as http:
        chat = await http.post(f"{base_url}/v1/chat/completions",
                               json={"messages": messages, "max_tokens": 3, "ignore_eos": True})
        assert chat.status_code == 200, chat.text
        completion = await http.post(f"{base_url}/v1/completions",
                                     json={"prompt": "Name a river.", "max_tokens": 3, "ignore_eos": True})
        assert completion.status_code == 200, completion.text
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    _, contexts = await asked_for(asked, lambda prompts, _: "User: And in Europe?" in prompts[0])
    assert contexts == [PromptContext(previous_output_tokens=(answer_tokens,), query="And in Europe?")]
    _, contexts = await asked_for(asked, lambda prompts, _: prompts == ["Name a river."])
    assert contexts is None


async def test_the_sdks_conversation_reaches_the_predictor_and_a_bad_one_is_refused(served):
    _, address, asked = served
    async with AsyncClient(address) as client:
        await client.complete("Rendered: system prompt, turns, query", max_tokens=2, ignore_eos=True,
                              conversation=Conversation("the query", (12, 0, 40)))
        with pytest.raises(InvalidRequest, match="previous_output_tokens must be >= 0"):
            await client.complete("x", max_tokens=2, conversation=Conversation("q", (5, -1)))
        with pytest.raises(InvalidRequest, match="at most 1024 are allowed"):
            await client.complete("x", max_tokens=2, conversation=Conversation("q", (1,) * 1025))
    _, contexts = await asked_for(asked, lambda prompts, _: prompts[0].startswith("Rendered"))
    assert contexts == [PromptContext(previous_output_tokens=(12, 0, 40), query="the query")]
