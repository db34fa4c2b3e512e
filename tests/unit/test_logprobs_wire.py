"""Logprobs on the wire: a request's ``logprobs`` from the SDK to the worker's SamplingParams
(checked before any call), a worker's per-token logprobs through its step report, and the
scheduler's Generate responses into the SDK's chunks and completion."""

from __future__ import annotations

import pytest

from alise.client import TokenLogprobs
from alise.client._convert import build_request, join_chunks, to_chunk
from alise.common import wire
from alise.core.commands import JobOutput, StepReport
from alise.core.commands import TokenLogprobs as CoreLogprobs
from alise.core.sampling import SamplingParams
from alise.v1 import scheduler_pb2

ARGS = dict(max_tokens=8, temperature=None, top_p=None, top_k=0, seed=None, stop_token_ids=(),
            ignore_eos=False, request_id="", oracle_output_tokens=0)
LP = TokenLogprobs(-0.5, (3, 9), (-0.25, -1.5))


@pytest.mark.parametrize("value", [0, 1, 20])
def test_the_sdk_sends_logprobs_and_the_scheduler_reads_them(value):
    sampling = build_request("hi", **ARGS, logprobs=value).sampling
    assert sampling.HasField("logprobs") and sampling.logprobs == value
    assert wire.sampling_from_pb(sampling, 16).logprobs == value
    assert wire.sampling_from_pb(wire.sampling_to_pb(SamplingParams(logprobs=value)), 16).logprobs == value


def test_no_logprobs_leaves_the_field_unset():
    sampling = build_request("hi", **ARGS).sampling
    assert not sampling.HasField("logprobs") and wire.sampling_from_pb(sampling, 16).logprobs is None
    assert not wire.sampling_to_pb(SamplingParams()).HasField("logprobs")


@pytest.mark.parametrize("value", [-1, 21, True, 2.0])
def test_a_bad_logprobs_is_refused_by_name_before_any_call(value):
    with pytest.raises(ValueError, match=r"logprobs must be an integer in \[0, 20\]"):
        build_request("hi", **ARGS, logprobs=value)
    with pytest.raises(ValueError, match="logprobs must be an integer in"):
        SamplingParams(logprobs=value)


def test_a_step_report_carries_each_tokens_logprobs():
    lp = CoreLogprobs(LP.logprob, LP.top_ids, LP.top_logprobs)  # the worker's own type on the wire
    report = StepReport(step_id=3, outputs=[JobOutput("a", [7], None, 5, [lp]), JobOutput("b", [8], None, 6)])
    back = wire.report_from_pb(wire.report_to_pb(report).report)
    assert back.outputs[0].logprobs == [lp] and back.outputs[1].logprobs is None


def test_a_report_with_logprobs_not_one_per_token_is_a_wire_error():
    pb = wire.report_to_pb(StepReport(step_id=3, outputs=[JobOutput("a", [7], None, 5, [LP])])).report
    pb.outputs[0].token_ids.append(8)
    with pytest.raises(wire.WireError, match="1 logprobs for 2 tokens"):
        wire.report_from_pb(pb)


def response(token_ids, logprobs=(), **kwargs) -> scheduler_pb2.GenerateResponse:
    msg = scheduler_pb2.GenerateResponse(request_id="r", token_ids=token_ids, **kwargs)
    wire.logprobs_to_pb(list(logprobs), msg.logprobs)
    return msg


def test_chunks_expose_the_logprobs_and_a_completion_joins_them():
    other = TokenLogprobs(-2.0)
    chunks = [to_chunk(response([7], [LP])), to_chunk(response([8, 9], [other, LP], index=1, finish_reason=1))]
    assert chunks[0].logprobs == [LP] and chunks[1].logprobs == [other, LP]
    assert join_chunks(chunks).logprobs == [LP, other, LP]


def test_a_chunk_without_logprobs_leaves_the_completion_without_them():
    # A resumed stream's catch-up chunk: tokens made while the client was away carry none.
    chunks = [to_chunk(response([7], [LP])), to_chunk(response([8], index=1, finish_reason=1))]
    assert chunks[1].logprobs is None and join_chunks(chunks).logprobs is None
