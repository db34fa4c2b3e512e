"""Requests too large to be worth parsing: refused from their size and raw bytes, with the
same messages as their parsed counterparts, and nothing else harmed. Raw bytes are sent (no
SDK), so the test controls the exact encoding."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from cluster_fixtures import cluster

from alise.v1 import common_pb2, scheduler_pb2

CONTEXT = 256  # the tiny test model's
pytestmark = pytest.mark.asyncio(loop_scope="module")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def token_id_prompt(num_ids: int, token_id: int, *, packed: bool = True) -> bytes:
    """A GenerateRequest whose prompt is ``num_ids`` copies of ``token_id`` (field 3, TokenIds)."""
    one = varint(token_id)
    ids = field(1, one * num_ids) if packed else (varint(1 << 3) + one) * num_ids
    return field(3, ids) + varint(4 << 3 | 2) + varint(2) + bytes([8, 4])   # sampling: max_tokens 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tiny_llama_dir):
    async with cluster(str(tiny_llama_dir)) as c:
        yield c


async def call(live, raw: bytes) -> grpc.aio.AioRpcError | list:
    async with grpc.aio.insecure_channel(live.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        generate = ch.unary_stream("/alise.v1.SchedulerService/Generate",
                                   response_deserializer=scheduler_pb2.GenerateResponse.FromString)
        try:
            return [r async for r in generate(raw, timeout=60)]
        except grpc.aio.AioRpcError as exc:
            return exc


@pytest.mark.parametrize("raw, says", [
    # 5 million ids (3 bytes each), all outside the vocabulary: the length is what is wrong first.
    (token_id_prompt(5_000_000, 10**6), "prompt has 5000000 tokens; the model's context is 256 tokens"),
    (token_id_prompt(8_000_000, 5), "prompt has 8000000 tokens; the model's context is 256 tokens"),
    (token_id_prompt(40_000, 5, packed=False), "prompt has at least 256 tokens; the model's context is 256"),
    (token_id_prompt(300, 5), "prompt has 300 tokens; the model's context is 256 tokens"),   # parsed: small
    (token_id_prompt(CONTEXT, 5), f"prompt has {CONTEXT} tokens"),
    (field(4, common_pb2.SamplingParams(stop_token_ids=[7] * 70_000).SerializeToString()) + field(2, b"hi"),
     "sampling parameters take 70004 bytes, more than 16384: at most 1024 stop_token_ids"),
    (field(4, common_pb2.SamplingParams(stop_token_ids=[7] * 2_000).SerializeToString()) + field(2, b"hi"),
     "sampling: at most 1024 stop_token_ids, got 2000"),
    (field(2, b"hi") + field(99, b"") * 40_000, "could not be parsed: more than 64 fields"),
], ids=["5M-outside-vocab", "8M", "unpacked", "300-parsed", "exactly-context", "sampling-raw",
        "sampling-parsed", "field-spam"])
async def test_oversized_parts_are_refused(live, raw, says):
    result = await call(live, raw)
    assert isinstance(result, grpc.aio.AioRpcError), result
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in result.details()


async def test_a_bad_id_in_a_prompt_of_allowed_length_is_named_by_position(live):
    ids = [5] * 100
    ids[70] = 99_999
    raw = scheduler_pb2.GenerateRequest(token_ids=scheduler_pb2.TokenIds(ids=ids)).SerializeToString()
    result = await call(live, raw)
    assert "token id 99999 at position 70 is outside the vocabulary" in result.details()


async def test_prompts_of_allowed_length_are_served_after_the_refusals(live):
    for num_ids in (CONTEXT - 5, 3):
        responses = await call(live, token_id_prompt(num_ids, 5))
        assert sum(len(r.token_ids) for r in responses) == 4
        assert responses[-1].usage.prompt_tokens == num_ids
