"""Checks of a Generate request that must not cost more than its size says.

Order matters for cost: what a request claims is checked from its size before anything is
done per token. A request of ``PRECHECK_MIN_BYTES`` or more is first looked at in its raw
bytes (``generate_precheck``, run by the decode guard before parsing): a token-id prompt as
long as the context or longer, outsized sampling parameters or a flood of fields are refused
without parsing them (parsing a packed list of ids holds the GIL for ~25 ns a byte on a busy
CPU, in any thread). After parsing, the scheduler checks the id count first; converting,
checking and decoding the ids (``token_prompt``) run in a thread, bounded by the context.

A text prompt is bounded in characters before it is tokenized (``check_text_prompt``): the
context holds at most ``max_model_len * MAX_CHARS_PER_TOKEN`` characters of text, so a longer
one is refused without tokenizing it (megabytes of text take seconds of tokenizer time, and
every thread of the pool that tokenizes is one that other requests wait for). A text field
over four times that in bytes is refused unparsed.

A request id is checked (``check_request_id``) before anything logs it.

The functions raise ``ValueError`` with the message a client is given (INVALID_ARGUMENT).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
from alise.common.grpc_server import count_varints, iter_fields
from alise.v1 import scheduler_pb2

if TYPE_CHECKING:  # the HTTP door imports the text bound; the tokenizer module pulls in torch
    from alise.scheduler.tokenizer import ModelInfo

MAX_REQUEST_ID_CHARS = 128
#: A request this large or larger is looked at in its raw bytes before it is parsed.
PRECHECK_MIN_BYTES = 64 * 1024
#: Stop token ids one request may give (each is checked at every step of the request).
MAX_STOP_TOKEN_IDS = 1024
#: Raw size of SamplingParams past which it is refused unparsed (1,024 stop ids take <= 5 KiB).
MAX_SAMPLING_BYTES = 16 * 1024

#: Characters of text one token covers at most, for the bound above. Measured over the
#: 14,418 prompts and outputs of ../shared/data (bench/http_prompt_chars.py, docs/http.md):
#: 4.5 characters a token on average, 6.5 at the 99th percentile, 48.5 at most (ASCII art
#: under WordPiece, which does not tokenize whitespace); 64 leaves a third more.
MAX_CHARS_PER_TOKEN = 64
_UTF8_MAX_BYTES = 4

_FIELDS = scheduler_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
_TOKEN_IDS, _SAMPLING = _FIELDS["token_ids"].number, _FIELDS["sampling"].number
_TEXT = _FIELDS["text"].number
_IDS = scheduler_pb2.TokenIds.DESCRIPTOR.fields_by_name["ids"].number
#: Top-level fields a GenerateRequest may have on the wire (it defines a handful).
MAX_TOP_LEVEL_FIELDS = 64


def prompt_too_long(num_tokens: int, limit: int, *, at_least: bool = False) -> str:
    return (f"prompt has {'at least ' if at_least else ''}{num_tokens} tokens; the model's context is "
            f"{limit} tokens, so a prompt must have fewer to leave room for output")


def max_text_chars(max_model_len: int) -> int:
    """Characters a text prompt may have for a context of ``max_model_len`` tokens."""
    return max_model_len * MAX_CHARS_PER_TOKEN


def text_too_long(num_chars: int, max_model_len: int, *, at_least: bool = False,
                  subject: str = "prompt has") -> str:
    return (f"{subject} {'at least ' if at_least else ''}{num_chars} characters; the model's context of "
            f"{max_model_len} tokens holds at most {max_text_chars(max_model_len)} characters of text "
            f"({MAX_CHARS_PER_TOKEN} a token), so it cannot fit")


def check_text_prompt(text: str, max_model_len: int, max_prompt_chars: int) -> None:
    """Raises ValueError unless ``text`` is short enough to tokenize: checked first, by its
    length alone. ``max_prompt_chars`` is the service's own cap (``--max-prompt-chars``)."""
    if len(text) > max_text_chars(max_model_len):
        raise ValueError(text_too_long(len(text), max_model_len))
    if len(text) > max_prompt_chars:
        raise ValueError(f"prompt has {len(text)} characters; the limit is {max_prompt_chars}")


def check_request_id(request_id: str) -> str:
    """The client's id, checked, or a new one when it gave none."""
    if not request_id:
        return uuid.uuid4().hex
    if not request_id.strip():
        raise ValueError(f"request_id is blank: give at most {MAX_REQUEST_ID_CHARS} printable "
                         "characters, or none for a server-made id")
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise ValueError(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    return request_id


def token_prompt(container, info: ModelInfo) -> tuple[list[int], str]:
    """Runs in a thread: the ids as a list, checked against the vocabulary, and their text."""
    ids = list(container)
    vocab = info.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        position, token = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab)
        raise ValueError(f"token id {token} at position {position} is outside the vocabulary [0, {vocab})")
    # Random-weight models' vocabularies can be larger than the tokenizer's: those ids have no text.
    known = len(info.tokenizer)
    return ids, info.tokenizer.decode(ids if max(ids) < known else [t for t in ids if t < known])


def generate_precheck(max_model_len: int):
    """The raw-bytes check of ``/alise.v1.SchedulerService/Generate``: a walk over at most
    ``MAX_TOP_LEVEL_FIELDS`` fields and one vectorized count, whatever the size."""
    def check(raw: bytes) -> tuple[grpc.StatusCode, str] | None:
        if len(raw) < PRECHECK_MIN_BYTES:
            return None
        view = memoryview(raw)
        for number, wire_type, start, end in iter_fields(view, MAX_TOP_LEVEL_FIELDS):
            if wire_type != 2:
                continue
            if number == _TOKEN_IDS:
                num_ids, exact = _count_ids(view[start:end], max_model_len)
                if num_ids >= max_model_len:
                    return grpc.StatusCode.INVALID_ARGUMENT, prompt_too_long(num_ids, max_model_len,
                                                                             at_least=not exact)
            elif number == _TEXT and (end - start) // _UTF8_MAX_BYTES > max_text_chars(max_model_len):
                return grpc.StatusCode.INVALID_ARGUMENT, text_too_long(
                    (end - start) // _UTF8_MAX_BYTES, max_model_len, at_least=True)
            elif number == _SAMPLING and end - start > MAX_SAMPLING_BYTES:
                return grpc.StatusCode.INVALID_ARGUMENT, (
                    f"sampling parameters take {end - start} bytes, more than {MAX_SAMPLING_BYTES}: "
                    f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return None
    return check


def _count_ids(token_ids: memoryview, stop_at: int) -> tuple[int, bool]:
    """Ids in a TokenIds message's bytes: packed runs counted whole, ids sent one by one
    counted until ``stop_at``; (count, whether it is exact)."""
    count = 0
    for number, wire_type, start, end in iter_fields(token_ids, stop_at + MAX_TOP_LEVEL_FIELDS):
        if number == _IDS:
            count += count_varints(token_ids[start:end]) if wire_type == 2 else 1
            if count >= stop_at and wire_type != 2:
                return count, False
    return count, True
