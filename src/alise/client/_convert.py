"""Request building and response conversion shared by the async and sync clients."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from alise.client.channel import MAX_MESSAGE_BYTES
from alise.client.errors import InvalidRequest
from alise.client.types import Chunk, Completion, Conversation, Estimate, Status, Usage
from alise.v1 import common_pb2, scheduler_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
}


def call_metadata(token: str | None, default: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A call's metadata: its own bearer token when given, else the client's."""
    return (("authorization", f"Bearer {token}"),) if token else default


def build_request(prompt: str | Sequence[int], *, max_tokens: int | None, temperature: float | None,
                  top_p: float | None, top_k: int, seed: int | None,
                  stop_token_ids: Sequence[int], ignore_eos: bool, request_id: str,
                  oracle_output_tokens: int, min_p: float | None = None,
                  conversation: Conversation | None = None,
                  strict_max_tokens: bool = False) -> scheduler_pb2.GenerateRequest:
    req = scheduler_pb2.GenerateRequest(request_id=request_id, oracle_output_tokens=oracle_output_tokens,
                                        strict_max_tokens=strict_max_tokens)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    if conversation is not None:
        req.conversation.query = conversation.query
        req.conversation.previous_output_tokens.extend(conversation.previous_output_tokens)
    s = req.sampling
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if temperature is not None:
        s.temperature = temperature
    if top_p is not None:
        s.top_p = top_p
    s.top_k = top_k
    if min_p is not None:
        s.min_p = min_p
    if seed is not None:
        s.seed = seed
    s.stop_token_ids.extend(stop_token_ids)
    s.ignore_eos = ignore_eos
    num_bytes = req.ByteSize()
    if num_bytes > MAX_MESSAGE_BYTES:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request is {num_bytes / 2**20:.1f} MiB; the SDK sends at most "
                             f"{MAX_MESSAGE_BYTES >> 20} MiB (the servers' limit too): shorten the prompt")
    return req


def to_chunk(msg: scheduler_pb2.GenerateResponse) -> Chunk:
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.ttft_s, u.e2e_s, u.queued_s,
                      u.num_preemptions)
    estimate = prompt_tokens = None
    if msg.HasField("estimate"):
        e = msg.estimate
        estimate = Estimate(e.mean, e.p50, e.p90, e.source)
    if msg.prompt_tokens:
        prompt_tokens = msg.prompt_tokens
    return Chunk(msg.request_id, list(msg.token_ids), msg.text, msg.index,
                 _FINISH.get(msg.finish_reason), usage, estimate, prompt_tokens)


def join_chunks(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    return Completion(
        request_id=last.request_id, text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason or "", usage=last.usage)


def to_status(msg: scheduler_pb2.GetStatusResponse) -> Status:
    # Plain attribute reads keep int64 fields ints (MessageToDict would make them strings).
    workers = [{f.name: getattr(w, f.name) for f in w.DESCRIPTOR.fields} for w in msg.workers]
    return Status(policy=msg.policy, workers=workers, num_waiting=msg.num_waiting,
                  num_running=msg.num_running, num_paused=msg.num_paused,
                  num_finished=msg.num_finished, predictor_state=msg.predictor_state,
                  uptime_s=msg.uptime_s, num_preemptions=msg.num_preemptions,
                  preemptions_by_action=dict(msg.preemptions_by_action), model=msg.model,
                  max_model_len=msg.max_model_len, num_admitted_tokens=msg.num_admitted_tokens,
                  num_cached_tokens=msg.num_cached_tokens, num_prefill_tokens=msg.num_prefill_tokens)
