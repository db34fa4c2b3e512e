"""Predict with a conversation's context, in-process on port 0, through the real client."""

import grpc
import pytest

from alise.predictor.client import PredictorClient, PredictorUnavailable
from alise.predictor.config import PredictorConfig
from alise.predictor.context import PromptContext
from alise.predictor.encoder import Encoder
from alise.predictor.history import prompt_key
from alise.predictor.service import start_predictor_server
from alise.v1 import predictor_pb2, predictor_pb2_grpc
from predictorkit import write_two_topics

SYSTEM = "<|system|>\n" + " ".join(["You are a helpful assistant who follows the house rules."] * 40) + "\n"


@pytest.fixture(scope="module")
def encoder():
    return Encoder(num_threads=2)


@pytest.fixture
async def server(encoder, tmp_path):
    path = write_two_topics(tmp_path / "tiny.jsonl.gz")
    config = PredictorConfig(address="127.0.0.1:0", model="m1", bootstrap=(str(path),))
    srv = await start_predictor_server(config, encoder=encoder)
    yield srv
    await srv.stop(0.5)


@pytest.fixture
async def client(server):
    c = PredictorClient(f"127.0.0.1:{server.port}")
    yield c
    await c.close()


def chat(user: str) -> str:
    return f"{SYSTEM}<|user|>\n{user}\n<|assistant|>\n"


async def test_the_service_learns_from_observed_conversations_what_earlier_answers_say(client, server):
    prompt = "Write a long detailed essay about rivers"
    wordy_turn = PromptContext(previous_output_tokens=(1500, 1800, 1200), query=prompt)
    [alone] = await client.predict([prompt], timeout_s=10)
    [empty] = await client.predict([prompt], timeout_s=10, contexts=[PromptContext()])
    # a fresh predictor has seen no conversation: earlier answers move nothing yet
    [fresh] = await client.predict([chat(prompt)], timeout_s=10, contexts=[wordy_turn])
    assert empty.p50 == pytest.approx(alone.p50) and fresh.p50 == pytest.approx(alone.p50)
    # conversations whose answers are alike within and unlike between, observed by prediction id
    for i in range(80):
        words = 900 if i % 2 else 3
        question = f"Tell me about topic {i}"
        [est] = await client.predict([chat(question)], timeout_s=10, contexts=[
            PromptContext(previous_output_tokens=(words, words + 1), query=question)])
        await client.observe("", words, prediction_id=est.prediction_id, timeout_s=10)
    assert server.runtime.estimator.context_prior_turns("m1") < 2
    [wordy], [terse] = [await client.predict([chat(prompt)], timeout_s=10, contexts=[
        PromptContext(previous_output_tokens=lengths, query=prompt)]) for lengths in ((1500, 1800, 1200), (2, 3))]
    assert terse.p50 < alone.p50 / 2 and wordy.p50 > 2 * alone.p50


async def test_a_query_is_read_in_place_of_the_rendered_prompt_and_is_what_is_stored(client, server):
    short, long = "Write a one-word answer: what color is grass", "Write a long detailed essay about rivers"
    # Behind 480 tokens of system prompt, the encoder sees the same window for both prompts.
    rendered = await client.predict([chat(short), chat(long)], timeout_s=10)
    assert rendered[0].p50 == pytest.approx(rendered[1].p50, rel=0.05)
    by_query = await client.predict([chat(short), chat(long)], timeout_s=10,
                                    contexts=[PromptContext(query=short), PromptContext(query=long)])
    plain = await client.predict([short, long], timeout_s=10)
    assert [e.p50 for e in by_query] == pytest.approx([e.p50 for e in plain])
    assert by_query[0].p50 < by_query[1].p50 / 10
    await client.observe("", 7, prediction_id=by_query[0].prediction_id, timeout_s=10)
    history = server.runtime.history
    assert history.row_of_key(prompt_key(short)) is not None
    assert history.row_of_key(prompt_key(chat(short))) is None


@pytest.mark.parametrize("contexts,message", [
    ([predictor_pb2.PromptContext()], r"contexts: 1 given for 2 prompts \(give one per prompt, or none\)"),
    ([predictor_pb2.PromptContext(), predictor_pb2.PromptContext(previous_output_tokens=[5, -1])],
     r"contexts\[1\].previous_output_tokens has a negative length"),
])
async def test_contexts_that_do_not_fit_the_prompts_are_invalid_argument(server, contexts, message):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = predictor_pb2_grpc.PredictorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError, match=message) as info:
            await stub.Predict(predictor_pb2.PredictRequest(prompts=["a", "b"], contexts=contexts), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = await stub.Predict(predictor_pb2.PredictRequest(prompts=["a", "b"]), timeout=10)
        assert len(reply.predictions) == 2  # the server goes on


async def test_the_client_names_a_refused_context(client):
    with pytest.raises(PredictorUnavailable, match="negative length") as info:
        await client.predict(["a"], timeout_s=10, contexts=[PromptContext(previous_output_tokens=(-3,))])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
