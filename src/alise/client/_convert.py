"""Request building and response conversion shared by the async and sync clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor

from alise.client.channel import MAX_MESSAGE_BYTES
from alise.client.errors import InvalidRequest
from alise.client.types import Chunk, Completion, Conversation, Estimate, Status, TokenLogprobs, Usage
from alise.sampling_rules import (
    check_logit_bias,
    check_logprobs,
    check_min_tokens,
    check_penalty,
    check_repetition_penalty,
)
from alise.v1 import common_pb2, scheduler_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
}


def call_timeout_s(timeout_s: float | None, default: float | None) -> float | None:
    """A call's deadline in seconds: its own, else the client's (None: none). One that is no
    time (0, negative, NaN) is a ValueError: gRPC would fail the call at once, and 0 is easily
    taken for "no deadline"."""
    if timeout_s is None:
        return default
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds (None: no deadline), got {timeout_s}")
    return timeout_s


def is_carriable_token(token: str) -> bool:
    """Whether a gRPC header can carry ``token`` (printable ASCII; gRPC refuses anything else
    as "Invalid metadata" only once the call is made)."""
    return token.isascii() and token.isprintable()


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``token`` (none without one); ValueError, not naming the
    token (a secret), for one no header can carry."""
    if not token:
        return ()
    if not is_carriable_token(token):
        raise ValueError("the token holds a character no gRPC header can carry (a control or non-ASCII "
                         "character): a token is printable ASCII")
    return (("authorization", f"Bearer {token}"),)


def call_metadata(token: str | None, default: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A call's metadata: its own bearer token when given, else the client's."""
    return bearer_metadata(token) if token else default


#: The integer fields' ranges: protobuf's own error ("Value out of range: -1") names neither.
_INT_RANGES = {FieldDescriptor.CPPTYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
               FieldDescriptor.CPPTYPE_INT64: (-2**63, 2**63 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1)}


def _set(message, name: str, value, label: str | None = None) -> None:
    """``message.name = value`` (extended, for a repeated field), or a ValueError or TypeError
    that names the argument (``label``, default ``name``) and what it may be."""
    label = label or name
    field = message.DESCRIPTOR.fields_by_name[name]
    repeated = field.is_repeated
    if repeated and not isinstance(value, (list, tuple)):
        value = list(value)  # read once: a generator would be spent by the range check
    bounds = _INT_RANGES.get(field.cpp_type)
    for v in (value if repeated else (value,)) if bounds else ():
        if isinstance(v, int) and not isinstance(v, bool) and not bounds[0] <= v <= bounds[1]:
            raise ValueError(f"{label} must be in [{bounds[0]}, {bounds[1]}], got {v}")
    try:
        if repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    except OverflowError:  # an integer past any float
        raise ValueError(f"{label} is out of range: a number of {len(str(abs(value)))} digits") from None
    except TypeError as exc:
        raise TypeError(f"{label}: {exc}") from None


def _set_adjustments(sampling: common_pb2.SamplingParams, max_tokens: int | None, *,
                     presence_penalty: float, frequency_penalty: float, repetition_penalty: float,
                     min_tokens: int, logit_bias: Mapping[int, float] | None) -> None:
    """vLLM's penalties, ``min_tokens`` and ``logit_bias`` into ``sampling``, checked by the
    scheduler's rules (``alise.sampling_rules``; the vocabulary is the scheduler's to check);
    neutral values are left unset."""
    for name, value, neutral in (("presence_penalty", presence_penalty, 0), ("frequency_penalty", frequency_penalty, 0),
                                 ("repetition_penalty", repetition_penalty, 1)):
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral):
            continue
        _set(sampling, name, value)  # a wrong type or a number past any float, named
        if name == "repetition_penalty":
            check_repetition_penalty(value)
        else:
            check_penalty(name, value)
    if min_tokens:
        _set(sampling, "min_tokens", min_tokens)
        check_min_tokens(min_tokens, max_tokens)
    if logit_bias:
        if not isinstance(logit_bias, Mapping):
            raise TypeError(f"logit_bias must be a mapping of token id -> bias, got {type(logit_bias).__name__}")
        pairs = check_logit_bias(logit_bias)
        if pairs[-1][0] > 2**31 - 1:
            raise ValueError(f"logit_bias keys must be in [0, 2147483647], got {pairs[-1][0]}")
        sampling.logit_bias.update(dict(pairs))


def build_request(prompt: str | Sequence[int], *, max_tokens: int | None, temperature: float | None,
                  top_p: float | None, top_k: int, seed: int | None,
                  stop_token_ids: Sequence[int], ignore_eos: bool, request_id: str,
                  oracle_output_tokens: int, min_p: float | None = None,
                  conversation: Conversation | None = None,
                  strict_max_tokens: bool = False, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, min_tokens: int = 0,
                  logit_bias: Mapping[int, float] | None = None,
                  logprobs: int | None = None) -> scheduler_pb2.GenerateRequest:
    req = scheduler_pb2.GenerateRequest(request_id=request_id, strict_max_tokens=strict_max_tokens)
    _set(req, "oracle_output_tokens", oracle_output_tokens)
    if isinstance(prompt, str):
        try:
            req.text = prompt
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 can carry it
            raise ValueError(f"prompt is not valid Unicode text (a lone surrogate at character {exc.start}); "
                             "it must be UTF-8") from None
    elif isinstance(prompt, Iterable) and not isinstance(prompt, (bytes, bytearray, memoryview)):
        try:
            _set(req.token_ids, "ids", prompt, "prompt token ids")
        except TypeError as exc:
            raise TypeError(f"prompt must be a string or a sequence of token ids ({exc})") from None
    else:
        raise TypeError(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
    if conversation is not None:
        req.conversation.query = conversation.query
        req.conversation.previous_output_tokens.extend(conversation.previous_output_tokens)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
    for name, value in sampling.items():
        if value is not None:  # unset: the scheduler's default
            _set(req.sampling, name, value)
    _set_adjustments(req.sampling, max_tokens, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     repetition_penalty=repetition_penalty, min_tokens=min_tokens, logit_bias=logit_bias)
    if logprobs is not None:
        check_logprobs("logprobs", logprobs)
        req.sampling.logprobs = logprobs
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
    logprobs = [TokenLogprobs(lp.logprob, tuple(lp.top_ids), tuple(lp.top_logprobs)) for lp in msg.logprobs]
    return Chunk(msg.request_id, list(msg.token_ids), msg.text, msg.index,
                 _FINISH.get(msg.finish_reason), usage, estimate, prompt_tokens,
                 logprobs if len(logprobs) == len(msg.token_ids) and logprobs else None)


def join_chunks(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    with_tokens = [c for c in chunks if c.token_ids]
    has_logprobs = bool(with_tokens) and all(c.logprobs is not None for c in with_tokens)
    return Completion(
        request_id=last.request_id, text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason or "", usage=last.usage,
        logprobs=[lp for c in with_tokens for lp in c.logprobs or ()] if has_logprobs else None)


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
