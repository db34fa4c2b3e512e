"""The scheduler's checks of a Generate request, all in one place (``GenerateChecks``).

What a checked request holds is what the engine may take as given: a request id fit for a
log line, a prompt of 1 .. ``max_model_len - 1`` tokens in the vocabulary (and its text),
valid sampling parameters (``SamplingParams`` checks its own fields) with at most
``MAX_STOP_TOKEN_IDS`` stop ids in the vocabulary, logit biases of tokens in it, and resume
tokens that leave room for one more. A request that asks for it (``strict_max_tokens``, as the
HTTP door does) also has a prompt and an explicit ``max_tokens`` that fit the context
together, as vLLM requires; without it a job ends where the context fills (finish reason "length"). Every failure is a
``ValueError`` whose message the client is given (INVALID_ARGUMENT).
The HTTP door checks the shape of its own JSON bodies itself and borrows the text bound and
the request-id check from here.

Order matters for cost: what a request claims is checked from its size before anything is
done per token. A request of ``PRECHECK_MIN_BYTES`` or more is first looked at in its raw
bytes (``generate_precheck``, run by the decode guard before parsing): a token-id prompt as
long as the context or longer, outsized sampling parameters or a flood of fields are refused
without parsing them (parsing a packed list of ids holds the GIL for ~25 ns a byte on a busy
CPU, in any thread). After parsing, the scheduler checks the id count first; converting,
checking and decoding the ids (``token_prompt``) run off the event loop, bounded by the context.

A text prompt is bounded in characters before it is tokenized (``check_text_prompt``): the
context holds at most ``max_model_len * MAX_CHARS_PER_TOKEN`` characters of text, so a longer
one is refused without tokenizing it (megabytes of text take seconds of tokenizer time, and
every thread of the pool that tokenizes is one that other requests wait for). A text field
over four times that in bytes is refused unparsed.

A request's conversation (the query and the earlier answers' lengths the length predictor
reads, ``check_conversation``) is bounded as a prompt's text is, and its answers in number.

A request id is checked (``check_request_id``) before anything logs it.

Prompts are made ready in batches (``alise.common.batches.InOrderBatches``): the prompts of every request that
arrives while a batch is under way go together in the next, one call off the event loop for
all of them (the texts tokenized in one tokenizer call), answered in the order they came. A
burst is then queued in the order it was sent, without a thread hop (and a loop wake-up) per
request.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from alise.common import wire
from alise.common.batches import InOrderBatches, outcome
from alise.common.grpc_server import count_varints, iter_fields
from alise.core.sampling import SamplingParams
from alise.predictor.context import PromptContext
from alise.v1 import scheduler_pb2

if TYPE_CHECKING:  # the HTTP door imports the text bound; ModelInfo's module imports transformers
    from alise.modelinfo.served import ModelInfo

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
#: Characters of text and token ids of the prompts made ready in one call at most (a batch
#: holds one prompt at least).
MAX_BATCH_WEIGHT = 1 << 20
#: Top-level fields a GenerateRequest may have on the wire (it defines a handful).
MAX_TOP_LEVEL_FIELDS = 64
#: Earlier answers a request's conversation may list (the predictor reads the latest 64).
MAX_PREVIOUS_ANSWERS = 1024
_CONVERSATION = _FIELDS["conversation"].number


def prompt_too_long(num_tokens: int, limit: int, *, at_least: bool = False) -> str:
    return (f"prompt has {'at least ' if at_least else ''}{num_tokens} tokens; the model's context is "
            f"{limit} tokens, so a prompt must have fewer to leave room for output")


def context_exceeded(num_prompt: int, max_tokens: int, limit: int) -> str:
    """vLLM's words for a prompt and max_tokens that do not fit the context together (clients
    match on them)."""
    return (f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.")


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
            elif number == _CONVERSATION and end - start > (bound := _max_conversation_bytes(max_model_len)):
                return grpc.StatusCode.INVALID_ARGUMENT, (
                    f"conversation takes {end - start} bytes, more than {bound}: "
                    f"a query of at most {max_text_chars(max_model_len)} characters and at most "
                    f"{MAX_PREVIOUS_ANSWERS} earlier answers")
            elif number == _SAMPLING and end - start > MAX_SAMPLING_BYTES:
                return grpc.StatusCode.INVALID_ARGUMENT, (
                    f"sampling parameters take {end - start} bytes, more than {MAX_SAMPLING_BYTES}: "
                    f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return None
    return check


def _max_conversation_bytes(max_model_len: int) -> int:
    """A Conversation's largest encoding: its query's text and the varints of its lengths."""
    return _UTF8_MAX_BYTES * max_text_chars(max_model_len) + 5 * MAX_PREVIOUS_ANSWERS + 16


def check_conversation(conversation: scheduler_pb2.Conversation, max_model_len: int) -> PromptContext | None:
    """The request's conversation as the predictor takes it (None: none given); ValueError
    for a query longer than any prompt may be, too many earlier answers or a negative one."""
    query, previous = conversation.query, conversation.previous_output_tokens
    if len(query) > max_text_chars(max_model_len):
        raise ValueError(text_too_long(len(query), max_model_len, subject="conversation.query has"))
    if len(previous) > MAX_PREVIOUS_ANSWERS:
        raise ValueError(f"conversation.previous_output_tokens has {len(previous)} answers; at most "
                         f"{MAX_PREVIOUS_ANSWERS} are allowed (send the latest)")
    if previous and min(previous) < 0:
        raise ValueError("conversation.previous_output_tokens must be >= 0")
    if not query.strip() and not previous:
        return None
    return PromptContext(tuple(previous), query if query.strip() else "")


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


@dataclass(frozen=True)
class CheckedRequest:
    """A Generate request that passed every check."""

    request_id: str
    token_ids: list[int]
    prompt_text: str
    sampling: SamplingParams
    #: The tokens a resumed stream's client already has (empty: a new stream).
    resume_token_ids: list[int]
    oracle_output_tokens: int | None
    #: The conversation the prompt continues, for the length estimate (None: not given).
    context: PromptContext | None = None


class GenerateChecks:
    """The checks of a parsed Generate request against the served model and the service's
    limits; the cheap ones first, tokenizing and per-id work last and off the event loop."""

    def __init__(self, info: ModelInfo, *, default_max_tokens: int, max_prompt_chars: int) -> None:
        self.info = info
        self.default_max_tokens = default_max_tokens
        self.max_prompt_chars = max_prompt_chars
        #: Prompts made into ids and text off the loop, a burst's together in one queue (so a
        #: text and a token-id prompt keep their order too), ``MAX_BATCH_WEIGHT`` at most a batch.
        self.prompts = InOrderBatches(self._prompts_of, weigh=len, max_batch_weight=MAX_BATCH_WEIGHT)

    async def check(self, request: scheduler_pb2.GenerateRequest) -> CheckedRequest:
        """Raises ValueError, with the message the client is given."""
        request_id = check_request_id(request.request_id)
        token_ids, prompt_text = await self._prompt(request)
        limit = self.info.max_model_len
        if len(token_ids) >= limit:
            raise ValueError(prompt_too_long(len(token_ids), limit))
        sampling = self._sampling(request)
        if (request.strict_max_tokens and request.sampling.HasField("max_tokens")
                and len(token_ids) + sampling.max_tokens > limit):
            raise ValueError(context_exceeded(len(token_ids), sampling.max_tokens, limit))
        if request.oracle_output_tokens < 0:
            raise ValueError("oracle_output_tokens must be >= 0")
        resume = self._resume_tokens(request, len(token_ids), sampling.max_tokens)
        has_context = request.HasField("conversation")
        context = check_conversation(request.conversation, limit) if has_context else None
        return CheckedRequest(request_id, token_ids, prompt_text, sampling, resume,
                              request.oracle_output_tokens or None, context)

    async def _prompt(self, request: scheduler_pb2.GenerateRequest) -> tuple[list[int], str]:
        """The prompt's token ids and text, bounded by its size before any per-token work."""
        info = self.info
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise ValueError("prompt is required: set text or token_ids")
        if kind == "token_ids":
            # The count first; the per-id work runs off the event loop, bounded by the context.
            num_ids = len(request.token_ids.ids)
            if not num_ids:
                raise ValueError("prompt is empty (no token ids)")
            if num_ids >= info.max_model_len:
                raise ValueError(prompt_too_long(num_ids, info.max_model_len))
            return await self.prompts.run(request.token_ids.ids)
        text = request.text
        # Its length first: tokenizing megabytes takes seconds of a pool thread.
        check_text_prompt(text, info.max_model_len, self.max_prompt_chars)
        if not text.strip():
            raise ValueError("prompt is empty")
        ids, _ = await self.prompts.run(text)
        if not ids:
            raise ValueError("prompt has no tokens after tokenization")
        return ids, text

    def _prompts_of(self, prompts: list) -> list[tuple[list[int], str] | BaseException]:
        """Runs in a thread: each prompt's ids and text, or the error it raises. The texts are
        tokenized in one call (one each if that call fails, so a bad one fails alone); token
        ids are checked and decoded (``token_prompt``)."""
        texts = [p for p in prompts if isinstance(p, str)]
        try:
            encoded = iter(self._encode_batch(texts) if texts else [])
        except Exception:
            encoded = iter([outcome(lambda t=text: self._encode_batch([t])[0]) for text in texts])
        results: list[tuple[list[int], str] | BaseException] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = next(encoded)
                results.append(ids if isinstance(ids, BaseException) else (ids, prompt))
            else:
                results.append(outcome(lambda p=prompt: token_prompt(p, self.info)))
        return results

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.info.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def _sampling(self, request: scheduler_pb2.GenerateRequest) -> SamplingParams:
        try:
            sampling = wire.sampling_from_pb(request.sampling, self.default_max_tokens)
        except ValueError as exc:
            raise ValueError(f"sampling: {exc}") from None
        stop = sampling.stop_token_ids
        if len(stop) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"sampling: at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop)}")
        bad_stop = [t for t in stop if not 0 <= t < self.info.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {self.info.vocab_size})")
        bad_bias = [t for t, _ in sampling.logit_bias if t >= self.info.vocab_size]
        if bad_bias:
            raise ValueError(f"logit_bias token ids {bad_bias[:5]} are outside the vocabulary "
                             f"[0, {self.info.vocab_size})")
        return sampling

    def _resume_tokens(self, request: scheduler_pb2.GenerateRequest, num_prompt: int,
                       max_tokens: int) -> list[int]:
        resume = list(request.resume_token_ids)
        if not resume:
            return resume
        limit, vocab = self.info.max_model_len, self.info.vocab_size
        if not request.request_id:
            raise ValueError("resume_token_ids need the request_id of the stream they resume")
        if len(resume) >= max_tokens:
            raise ValueError(f"resume_token_ids has {len(resume)} tokens; max_tokens is {max_tokens}, "
                             "so the stream had ended")
        if num_prompt + len(resume) >= limit:
            raise ValueError(f"prompt and resume_token_ids fill the model's context of {limit} tokens")
        if min(resume) < 0 or max(resume) >= vocab:
            raise ValueError(f"resume_token_ids must be in [0, {vocab})")
        return resume
