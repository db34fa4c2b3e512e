"""Turning a GenerateRequest into a job, or into a refusal a person can act on.

Order matters for cost: what a request claims is checked from its size before anything is
done per token. A request larger than ``PRECHECK_MIN_BYTES`` is first looked at in its raw
bytes (``generate_precheck``, run before parsing): a token-id prompt as long as the context
or longer, or outsized sampling parameters, are refused without parsing them (parsing a
packed list of ids holds the GIL for ~25 ns a byte, in any thread). After parsing, the id
count is checked first; converting, validating and decoding the ids run off the event loop
and are bounded by the context length.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from alise.common import wire
from alise.common.grpc_server import RETRY_AFTER_KEY, count_varints, iter_fields
from alise.core.job import Job, LengthEstimate
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.tokenizer import ModelInfo
from alise.v1 import scheduler_pb2

MAX_REQUEST_ID_CHARS = 128
#: A request this large or larger is looked at in its raw bytes before it is parsed.
PRECHECK_MIN_BYTES = 64 * 1024
#: Stop token ids one request may give (each is checked at every step of the request).
MAX_STOP_TOKEN_IDS = 1024
#: Raw size of SamplingParams past which it is refused unparsed (1,024 stop ids take <= 5 KiB).
MAX_SAMPLING_BYTES = 16 * 1024

_FIELDS = scheduler_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
_TOKEN_IDS, _SAMPLING = _FIELDS["token_ids"].number, _FIELDS["sampling"].number
_IDS = scheduler_pb2.TokenIds.DESCRIPTOR.fields_by_name["ids"].number
#: Top-level fields a GenerateRequest may have on the wire (it defines 6).
_MAX_TOP_LEVEL_FIELDS = 64


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s

    async def abort(self, context) -> None:
        trailing = ()
        if self.retry_after_s is not None:
            trailing = ((RETRY_AFTER_KEY, str(int(self.retry_after_s * 1000))),)
        await context.abort(self.code, str(self), trailing_metadata=trailing)


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def prompt_too_long(num_tokens: int, limit: int, *, at_least: bool = False) -> str:
    return (f"prompt has {'at least ' if at_least else ''}{num_tokens} tokens; the model's context is "
            f"{limit} tokens, so a prompt must have fewer to leave room for output")


def check_request_id(request_id: str) -> str:
    """The client's id (validated), or a new one when it gave none."""
    if not request_id:
        return uuid.uuid4().hex
    if not request_id.strip():
        raise invalid("request_id is blank: give at most 128 printable characters, or none for a "
                      "server-made id")
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise invalid(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    return request_id


def generate_precheck(max_model_len: int):
    """The raw-bytes check of ``/alise.v1.SchedulerService/Generate`` (see the module's
    docstring); a walk over a few fields and one vectorized count, whatever the size."""
    def check(raw: bytes) -> tuple[grpc.StatusCode, str] | None:
        if len(raw) < PRECHECK_MIN_BYTES:
            return None
        view = memoryview(raw)
        for number, wire_type, start, end in iter_fields(view, _MAX_TOP_LEVEL_FIELDS):
            if wire_type != 2:
                continue
            if number == _TOKEN_IDS:
                num_ids, exact = _count_ids(view[start:end], max_model_len)
                if num_ids >= max_model_len:
                    return grpc.StatusCode.INVALID_ARGUMENT, prompt_too_long(num_ids, max_model_len,
                                                                             at_least=not exact)
            elif number == _SAMPLING and end - start > MAX_SAMPLING_BYTES:
                return grpc.StatusCode.INVALID_ARGUMENT, (
                    f"sampling parameters take {end - start} bytes, more than {MAX_SAMPLING_BYTES}: "
                    f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return None
    return check


def _count_ids(token_ids: memoryview, stop_at: int) -> tuple[int, bool]:
    """Ids in a TokenIds message's bytes: packed runs counted whole, unpacked ids one by one
    until ``stop_at``; (count, whether it is exact)."""
    count = 0
    for number, wire_type, start, end in iter_fields(token_ids, stop_at + _MAX_TOP_LEVEL_FIELDS):
        if number == _IDS:
            count += count_varints(token_ids[start:end]) if wire_type == 2 else 1
            if count >= stop_at and wire_type != 2:
                return count, False
    return count, True


class RequestValidator:
    """Checks a parsed GenerateRequest and builds its job (raises RequestError)."""

    def __init__(self, config: SchedulerConfig, info: ModelInfo) -> None:
        self.config = config
        self.info = info

    async def make_job(self, request, estimate: LengthEstimate) -> Job:
        request_id = check_request_id(request.request_id)
        token_ids, prompt_text = await self._prompt_tokens(request)
        try:
            sampling = wire.sampling_from_pb(request.sampling, self.config.default_max_tokens)
        except ValueError as exc:
            raise invalid(f"sampling: {exc}") from None
        if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise invalid(f"sampling: at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got "
                          f"{len(sampling.stop_token_ids)}")
        bad_stop = [t for t in sampling.stop_token_ids if not 0 <= t < self.info.vocab_size]
        if bad_stop:
            raise invalid(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {self.info.vocab_size})")
        if request.oracle_output_tokens < 0:
            raise invalid("oracle_output_tokens must be >= 0")
        return Job(request_id, token_ids, sampling, arrival_s=time.monotonic(), estimate=estimate,
                   oracle_output_tokens=request.oracle_output_tokens or None, prompt_text=prompt_text)

    async def _prompt_tokens(self, request) -> tuple[list[int], str]:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise invalid("prompt is required: set text or token_ids")
        limit = self.info.max_model_len
        if kind == "token_ids":
            num_ids = len(request.token_ids.ids)
            if not num_ids:
                raise invalid("prompt is empty (no token ids)")
            if num_ids >= limit:
                raise invalid(prompt_too_long(num_ids, limit))
            return await asyncio.to_thread(self._token_prompt, request.token_ids.ids)
        text = request.text
        if not text.strip():
            raise invalid("prompt is empty")
        if len(text) > self.config.max_prompt_chars:
            raise invalid(f"prompt has {len(text)} characters; the limit is {self.config.max_prompt_chars}")
        ids = await asyncio.to_thread(self._encode, text)
        if not ids:
            raise invalid("prompt has no tokens after tokenization")
        if len(ids) >= limit:
            raise invalid(prompt_too_long(len(ids), limit))
        return ids, text

    def _token_prompt(self, container) -> tuple[list[int], str]:
        """Runs in a thread: the ids as a list, checked against the vocabulary, and their text."""
        ids = list(container)
        vocab = self.info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            position, token = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab)
            raise invalid(f"token id {token} at position {position} is outside the vocabulary [0, {vocab})")
        known = len(self.info.tokenizer)
        return ids, self.info.tokenizer.decode(ids if max(ids) < known else [t for t in ids if t < known])

    def _encode(self, text: str) -> list[int]:
        return self.info.tokenizer.encode(text, add_special_tokens=True)

