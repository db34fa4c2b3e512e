"""A burst of Generate requests leaves the scheduler's checks in the order it came, its text
prompts tokenized together (asyncio and a real tokenizer: no gRPC, no worker)."""

from __future__ import annotations

import asyncio
import time

import pytest

from alise.common.batches import InOrderBatches
from alise.modelinfo.served import ModelInfo
from alise.modelinfo.tokenizer import minilm_tokenizer
from alise.scheduler.request_checks import GenerateChecks
from alise.v1 import scheduler_pb2


class TimedTokenizer:
    """The MiniLM tokenizer, each text taking ``delay_s[text]`` to encode (a long prompt) and
    a text with "boom" in it refused; counts the calls it gets."""

    def __init__(self, delay_s: dict[str, float]) -> None:
        self.real = minilm_tokenizer()
        self.delay_s = delay_s
        self.num_calls = 0

    def _one(self, text: str) -> list[int]:
        if "boom" in text:
            raise ValueError("cannot encode this text")
        time.sleep(self.delay_s.get(text, 0.0))
        return self.real.encode(text, add_special_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.num_calls += 1
        return self._one(text)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        self.num_calls += 1
        return {"input_ids": [self._one(text) for text in texts]}

    def decode(self, ids: list[int]) -> str:
        return self.real.decode(ids)

    def __len__(self) -> int:
        return len(self.real)


def make_checks(tokenizer: TimedTokenizer) -> GenerateChecks:
    info = ModelInfo("timed", tokenizer, max_model_len=256, vocab_size=30522)
    return GenerateChecks(info, default_max_tokens=8, max_prompt_chars=100_000)


def request(prompt: str | list[int], i: int) -> scheduler_pb2.GenerateRequest:
    if isinstance(prompt, str):
        return scheduler_pb2.GenerateRequest(text=prompt, request_id=f"r{i}")
    return scheduler_pb2.GenerateRequest(token_ids=scheduler_pb2.TokenIds(ids=prompt), request_id=f"r{i}")


async def checked_in_order(checks: GenerateChecks, texts: list[str]) -> tuple[list[int], list]:
    """Checks every text at once; (the indices in the order their checks ended, the outcomes)."""
    done: list[int] = []

    async def one(i: int):
        try:
            return await checks.check(request(texts[i], i))
        finally:
            done.append(i)

    outcomes = await asyncio.gather(*(one(i) for i in range(len(texts))), return_exceptions=True)
    return done, outcomes


async def test_a_burst_is_tokenized_in_one_call_and_leaves_the_checks_in_the_order_it_came():
    # The earlier a prompt came, the longer it takes to encode: tokenized one by one in a
    # pool of threads, the later ones would be done first.
    texts = [f"prompt number {i} " + "word " * (16 - i) for i in range(16)]
    tokenizer = TimedTokenizer({text: 0.004 * (16 - i) for i, text in enumerate(texts)})
    done, outcomes = await checked_in_order(make_checks(tokenizer), texts)
    assert done == list(range(16))
    assert tokenizer.num_calls == 1
    assert [o.token_ids for o in outcomes] == [tokenizer.real.encode(t, add_special_tokens=True) for t in texts]
    assert [o.request_id for o in outcomes] == [f"r{i}" for i in range(16)]


async def test_text_and_token_id_prompts_of_one_burst_keep_their_order_together():
    # Slow texts, quick token-id prompts between them: made ready one by one in a pool of
    # threads, the token ids would overtake the texts.
    prompts = [f"slow text {i} " + "word " * 8 if i % 2 == 0 else [101, 2000 + i, 102] for i in range(12)]
    tokenizer = TimedTokenizer({p: 0.01 for p in prompts if isinstance(p, str)})
    checks = make_checks(tokenizer)
    done, outcomes = await checked_in_order(checks, prompts)
    assert done == list(range(12))
    assert checks.prompts.num_batches == 1
    for prompt, outcome in zip(prompts, outcomes, strict=True):
        if isinstance(prompt, str):
            assert outcome.token_ids == tokenizer.real.encode(prompt, add_special_tokens=True)
        else:
            assert outcome.token_ids == prompt and outcome.prompt_text == tokenizer.real.decode(prompt)


async def test_a_text_that_cannot_be_encoded_fails_alone_and_the_next_burst_is_one_more_call():
    tokenizer = TimedTokenizer({})
    checks = make_checks(tokenizer)
    texts = ["first prompt", "this one goes boom", "third prompt"]
    done, outcomes = await checked_in_order(checks, texts)
    assert done == [0, 1, 2]
    assert isinstance(outcomes[1], ValueError) and "cannot encode" in str(outcomes[1])
    assert outcomes[0].token_ids == tokenizer.real.encode("first prompt", add_special_tokens=True)
    assert outcomes[2].token_ids == tokenizer.real.encode("third prompt", add_special_tokens=True)
    calls = tokenizer.num_calls
    done, outcomes = await checked_in_order(checks, ["again", "and again"])
    assert done == [0, 1] and tokenizer.num_calls == calls + 1
    assert checks.prompts.num_batches == 2


async def test_a_caller_that_leaves_while_its_text_is_encoded_holds_no_one_else_up():
    texts = ["slow first prompt", "second prompt", "third prompt"]
    tokenizer = TimedTokenizer({texts[0]: 0.05})
    checks = make_checks(tokenizer)
    first = asyncio.ensure_future(checks.check(request(texts[0], 0)))
    await asyncio.sleep(0.01)  # its batch is being encoded
    others = [asyncio.ensure_future(checks.check(request(t, i + 1))) for i, t in enumerate(texts[1:])]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    results = await asyncio.wait_for(asyncio.gather(*others), 5)
    assert [r.request_id for r in results] == ["r1", "r2"]
    assert tokenizer.num_calls == 2  # the second and third came together


async def test_a_batch_whose_call_fails_fails_its_own_callers_and_the_next_batch_is_served():
    calls = []

    def run_batch(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("the batch call failed")
        return [item.upper() for item in items]

    batches = InOrderBatches(run_batch)
    first = await asyncio.gather(batches.run("a"), batches.run("bad"), return_exceptions=True)
    assert [type(r) for r in first] == [RuntimeError, RuntimeError]
    assert await asyncio.gather(batches.run("b"), batches.run("c")) == ["B", "C"]
    assert calls == [["a", "bad"], ["b", "c"]]
