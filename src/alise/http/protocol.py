"""OpenAI request bodies -> one typed ``GenerationRequest``, or a 400 that names the field.

The door checks only what it must to build a well-formed gRPC request: JSON types, 32-bit
ranges, the OpenAI features ALISE does not have. Values (``max_tokens >= 1``, ``top_p`` in
(0, 1], a prompt that fits the context, ...) are the scheduler's to judge, so its messages reach
the client unchanged and each rule lives in one place.

JSON ``null`` means "unset" for every field, as OpenAI's clients send it. vLLM's penalties,
``min_tokens`` and ``logit_bias`` are checked here by the scheduler's own rules
(``alise.sampling_rules``), so the 400 names the field; the logit biases' token ids against the
vocabulary stay the scheduler's. Fields OpenAI or vLLM define that ALISE cannot honour
(``n > 1``, ``echo``, tools, structured outputs, ...) are refused rather than silently
dropped (``extras``); fields neither defines are ignored, as vLLM ignores them, so newer
clients keep working.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from alise.client import Conversation
from alise.http.errors import bad_request
from alise.http.extras import refuse_unsupported
from alise.sampling_rules import (
    MAX_LOGPROBS,
    check_logit_bias,
    check_min_tokens,
    check_penalty,
    check_repetition_penalty,
)

INT32_MAX = 2**31 - 1
UINT64_LIMIT = 2**64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
#: Roles accepted in chat messages ("developer" is OpenAI's newer name for "system").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

#: What chat_template_kwargs may not set: the variables the renderer passes itself and the
#: arguments of the renderer (transformers' ``apply_chat_template``), which are not template
#: variables: ``chat_template`` there would run the request's own template on the door.
RENDERER_ARGUMENTS = frozenset({
    "messages", "conversation", "add_generation_prompt", "tokenize", "chat_template", "tools", "documents",
    "continue_final_message", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})

_JSON_TYPE = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "an array", dict: "an object", type(None): "null"}


@dataclass(frozen=True)
class GenerationRequest:
    """One completion or chat completion, as the door will ask the scheduler for it."""

    prompt: str | list[int] | None       # completions; None for chat
    messages: list[dict] | None          # chat: [{"role", "content": str}], validated
    model: str | None
    stream: bool
    include_usage: bool
    continuous_usage: bool               # usage in every chunk (vLLM's continuous_usage_stats)
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int
    min_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    oracle_output_tokens: int
    return_token_ids: bool
    alise_stats: bool
    user: str | None
    request_id: str | None               # vLLM's: the scheduler's request id (and the response's)
    template_kwargs: dict                # chat: vLLM's chat_template_kwargs, for the template
    presence_penalty: float              # vLLM's logit adjustments (``alise.core.sampling``)
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    logit_bias: dict[int, float]
    #: The most likely tokens to list beside each output token's logprob (a completion's
    #: ``logprobs``, a chat's ``top_logprobs`` with ``logprobs: true``); None: no logprobs.
    logprobs: int | None
    #: chat: the conversation the request continues, for the length estimate (set once rendered)
    conversation: Conversation | None = None


def _describe(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _typed(body: Mapping, name: str, kinds: tuple[type, ...], what: str, within: str = ""):
    """``body[name]`` if it is JSON ``what``, else 400; ``within`` names the object ``body`` is
    (``stream_options``), so the client is told ``stream_options.include_usage``."""
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python, never in JSON.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        where = f"{within}.{name}" if within else name
        raise bad_request(f"{where} must be {what}, got {_describe(value)}", param=where)
    return value


def _int(body: Mapping, name: str, lo: int = -INT32_MAX - 1, hi: int = INT32_MAX) -> int | None:
    value = _typed(body, name, (int, float), "an integer")
    if isinstance(value, float) and not value.is_integer():  # (JSON's 5.0 is 5, as vLLM reads it)
        raise bad_request(f"{name} must be an integer, got {value}", param=name)
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return None if value is None else int(value)


def _seed(body: Mapping) -> int | None:
    """The request's seed as the worker's unsigned 64 bits. A negative one (vLLM takes any seed
    torch does) maps as ``torch.Generator.manual_seed`` maps it: to its 64-bit two's complement."""
    seed = _int(body, "seed", -(UINT64_LIMIT // 2), UINT64_LIMIT - 1)
    return None if seed is None else seed % UINT64_LIMIT


def _number(body: Mapping, name: str) -> float | None:
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:  # JSON integers have any size; floats end near 1.8e308
        raise bad_request(f"{name} is out of range: a number of {len(str(abs(value)))} digits",
                          param=name) from None


def _bool(body: Mapping, name: str, default: bool = False, within: str = "") -> bool:
    value = _typed(body, name, (bool,), "a boolean", within)
    return default if value is None else value


def _stop_strings(body: Mapping) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed",
                          param="stop")
    if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stops):
        raise bad_request(f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters",
                          param="stop")
    return tuple(stops)


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request(f"{name} must be an array of integers", param=name)
    if any(not -INT32_MAX - 1 <= t <= INT32_MAX for t in value):
        raise bad_request(f"{name} holds a value outside the 32-bit integer range", param=name)
    return value


def _checked(name: str, check: Callable[[], Any]) -> Any:
    """``check()``'s value, its ValueError (a rule of ``alise.sampling_rules``) as a 400 naming ``name``."""
    try:
        return check()
    except ValueError as exc:
        raise bad_request(str(exc), param=name) from None


def _penalty(body: Mapping, name: str, neutral: float) -> float:
    value = _number(body, name)
    if value is None:
        return neutral
    _checked(name, lambda: check_repetition_penalty(value) if name == "repetition_penalty"
             else check_penalty(name, value))
    return value


def _min_tokens(body: Mapping, max_tokens: int | None) -> int:
    """vLLM's ``min_tokens``; against ``max_tokens`` when the request sets it (else the
    scheduler checks it against its default)."""
    value = _int(body, "min_tokens") or 0
    _checked("min_tokens", lambda: check_min_tokens(value, max_tokens))
    return value


def _logit_bias(body: Mapping) -> dict[int, float]:
    """OpenAI's ``logit_bias``: an object of token ids (JSON keys are strings: ``"50256"``) to
    biases in [-100, 100]. The vocabulary's end is the scheduler's to check."""
    value = _typed(body, "logit_bias", (dict,), "an object")
    if not value:
        return {}
    bias = {}
    for key, item in value.items():
        if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) > INT32_MAX:
            raise bad_request(f"logit_bias keys must be token ids (integers >= 0), got {key!r}", param="logit_bias")
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise bad_request(f"logit_bias of token {key} must be a number, got {_describe(item)}",
                              param="logit_bias")
        bias[int(key)] = item
    return dict(_checked("logit_bias", lambda: check_logit_bias(bias)))


def _stream_options(body: Mapping, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage). As in vLLM, an object that leaves include_usage unset
    includes it, and usage in every chunk needs both."""
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is None:
        return False, False
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    include = _bool(options, "include_usage", default=True, within="stream_options")
    continuous = _bool(options, "continuous_usage_stats", within="stream_options")
    return include, include and continuous


def _template_kwargs(body: Mapping, chat: bool) -> dict:
    kwargs = _typed(body, "chat_template_kwargs", (dict,), "an object") if chat else None
    if kwargs is None:
        return {}
    taken = sorted(kwargs.keys() & RENDERER_ARGUMENTS)
    if taken:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(taken)}", param="chat_template_kwargs")
    return kwargs


def _completion_prompt(body: Mapping) -> str | list[int]:
    prompt = body.get("prompt")
    # A batch of one is the same request; larger batches need one request each.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"prompt holds {len(prompt)} prompts; send one prompt per request",
                          param="prompt")
    if isinstance(prompt, list):
        return _int_list(prompt, "prompt")
    if prompt is None:
        raise bad_request("prompt is required", param="prompt")
    raise bad_request(f"prompt must be a string or an array of token ids, got {_describe(prompt)}",
                      param="prompt")


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _describe(part)
                raise bad_request(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                  param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts, "
                      f"got {_describe(content)}", param=f"messages[{i}].content")


def _chat_messages(body: Mapping) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                              param=f"messages[{i}].role")
        content = message.get("content")
        if content is None and role == "assistant":  # OpenAI's clients send null for an empty turn
            content = ""
        out.append({"role": role, "content": _message_text(content, i)})
    return out


#: A lone UTF-16 surrogate: JSON may spell one (``"\\ud800"``), no valid text contains one.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Its JSON escape in a raw body: only bodies holding one are searched.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_at(body: Any) -> str | None:
    """Where the parsed ``body`` holds a string with a lone surrogate (``messages[0].content``),
    or None. Such a string cannot be encoded as UTF-8, so it can go nowhere."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return f"a key of {path or 'the body'}"
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    return None


def _logprobs(body: Mapping, chat: bool) -> int | None:
    """A completion's ``logprobs`` (0..20: the sampled token's logprob and that many most likely
    tokens'; vLLM's ``max_logprobs``); a chat's ``logprobs`` (a boolean) with ``top_logprobs``
    (0..20, which needs ``logprobs: true``, as vLLM and OpenAI refuse it alone)."""
    if not chat:
        return _int(body, "logprobs", 0, MAX_LOGPROBS)
    # vLLM reads a chat's logprobs 0 and 1 as false and true.
    asked = _typed(body, "logprobs", (bool, int), "a boolean")
    if asked is not None and not isinstance(asked, bool) and asked not in (0, 1):
        raise bad_request(f"logprobs must be a boolean, got {asked}", param="logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if not asked:
        if top:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def parse_request(body: Any, *, chat: bool) -> GenerationRequest:
    """Raises ApiError (400) naming the first field that cannot be used."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_describe(body)}")
    refuse_unsupported(body, chat=chat)
    # vLLM's priority scheduling: 0, its default, is accepted; no policy here orders by it.
    if priority := _int(body, "priority"):
        raise bad_request(f"priority must be 0: no ALISE policy schedules by priority (got {priority})",
                          param="priority")
    stream = _bool(body, "stream")
    include_usage, continuous_usage = _stream_options(body, stream)
    for name in ("session_id", "cache_salt"):  # no effect here: nothing is shared between requests
        _typed(body, name, (str,), "a string")
    max_tokens = _int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    top_k = _int(body, "top_k")
    model = _typed(body, "model", (str,), "a string")
    return GenerationRequest(
        prompt=None if chat else _completion_prompt(body),
        messages=_chat_messages(body) if chat else None,
        model=model, stream=stream, include_usage=include_usage, continuous_usage=continuous_usage,
        max_tokens=max_tokens, temperature=_number(body, "temperature"), top_p=_number(body, "top_p"),
        top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM's -1 = disabled
        min_p=_number(body, "min_p"),
        seed=_seed(body),
        stop=_stop_strings(body),
        stop_token_ids=tuple(_int_list(body["stop_token_ids"], "stop_token_ids"))
        if body.get("stop_token_ids") is not None else (),
        ignore_eos=_bool(body, "ignore_eos"),
        oracle_output_tokens=_int(body, "oracle_output_tokens") or 0,
        return_token_ids=_bool(body, "return_token_ids"), alise_stats=_bool(body, "alise_stats"),
        user=_typed(body, "user", (str,), "a string"),
        request_id=_typed(body, "request_id", (str,), "a string"),
        template_kwargs=_template_kwargs(body, chat),
        presence_penalty=_penalty(body, "presence_penalty", 0.0),
        frequency_penalty=_penalty(body, "frequency_penalty", 0.0),
        repetition_penalty=_penalty(body, "repetition_penalty", 1.0),
        min_tokens=_min_tokens(body, max_tokens), logit_bias=_logit_bias(body), logprobs=_logprobs(body, chat))
