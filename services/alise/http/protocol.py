"""OpenAI request bodies -> one typed ``GenerationRequest``, or a 400 that names the field.

The door checks only what it must to build a well-formed gRPC request: JSON types, 32-bit
ranges, the OpenAI features ALISE does not have. Values (``max_tokens >= 1``, ``top_p`` in
(0, 1], a prompt that fits the context, ...) are the scheduler's to judge, so its messages reach
the client unchanged and each rule lives in one place.

JSON ``null`` means "unset" for every field, as OpenAI's clients send it. Unknown fields are
ignored (as vLLM does), so newer clients keep working; fields ALISE knows but cannot honour
(``n > 1``, logprobs, penalties, tools, ...) are refused rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alise.http.errors import bad_request

INT32_MAX = 2**31 - 1
UINT64_LIMIT = 2**64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
#: Roles accepted in chat messages ("developer" is OpenAI's newer name for "system").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

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
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    priority: int
    oracle_output_tokens: int
    return_token_ids: bool
    alise_stats: bool
    user: str | None


def _describe(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _typed(body: Mapping, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python, never in JSON.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad_request(f"{name} must be {what}, got {_describe(value)}", param=name)
    return value


def _int(body: Mapping, name: str, lo: int = -INT32_MAX - 1, hi: int = INT32_MAX) -> int | None:
    value = _typed(body, name, (int,), "an integer")
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _number(body: Mapping, name: str) -> float | None:
    value = _typed(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    value = _typed(body, name, (bool,), "a boolean")
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


#: Known fields ALISE cannot honour: name -> (values that mean "off", why it is refused).
_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "n must be 1: one choice per request (send several requests instead)"),
    "best_of": ((1,), "best_of must be 1: one choice per request"),
    "logprobs": ((False, 0), "logprobs are not supported"),
    "top_logprobs": ((0,), "top_logprobs are not supported"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix is not supported"),
    "presence_penalty": ((0, 0.0), "presence_penalty is not supported (send 0 or leave it unset)"),
    "frequency_penalty": ((0, 0.0), "frequency_penalty is not supported (send 0 or leave it unset)"),
    "repetition_penalty": ((1, 1.0), "repetition_penalty is not supported (send 1 or leave it unset)"),
    "min_tokens": ((0,), "min_tokens is not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "tools": (([],), "tools are not supported"),
    "functions": (([],), "functions are not supported"),
    "tool_choice": (("none",), "tool_choice is not supported"),
    "response_format": (({"type": "text"},), "response_format other than text is not supported"),
}


def _refuse_unsupported(body: Mapping) -> None:
    for name, (neutral, message) in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            raise bad_request(message, param=name, code="unsupported_parameter")


def _stream_options(body: Mapping, stream: bool) -> bool:
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return _bool(options, "include_usage")


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
        out.append({"role": role, "content": _message_text(message.get("content"), i)})
    return out


def parse_request(body: Any, *, chat: bool) -> GenerationRequest:
    """Raises ApiError (400) naming the first field that cannot be used."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_describe(body)}")
    _refuse_unsupported(body)
    stream = _bool(body, "stream")
    max_tokens = _int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    top_k = _int(body, "top_k")
    model = _typed(body, "model", (str,), "a string")
    return GenerationRequest(
        prompt=None if chat else _completion_prompt(body),
        messages=_chat_messages(body) if chat else None,
        model=model, stream=stream, include_usage=_stream_options(body, stream),
        max_tokens=max_tokens, temperature=_number(body, "temperature"), top_p=_number(body, "top_p"),
        top_k=0 if top_k in (None, -1) else top_k,  # vLLM's -1 = disabled
        seed=_int(body, "seed", 0, UINT64_LIMIT - 1),
        stop=_stop_strings(body),
        stop_token_ids=tuple(_int_list(body["stop_token_ids"], "stop_token_ids"))
        if body.get("stop_token_ids") is not None else (),
        ignore_eos=_bool(body, "ignore_eos"), priority=_int(body, "priority") or 0,
        oracle_output_tokens=_int(body, "oracle_output_tokens") or 0,
        return_token_ids=_bool(body, "return_token_ids"), alise_stats=_bool(body, "alise_stats"),
        user=_typed(body, "user", (str,), "a string"))
