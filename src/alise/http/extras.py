"""The request fields the door knows but does not implement: OpenAI's and vLLM's.

vLLM's OpenAI server takes many fields beyond OpenAI's (``CompletionRequest`` and
``ChatCompletionRequest`` in its protocol): sampling parameters, structured outputs, chat
template controls, engine hints. A field the door cannot honour is refused (400, code
``unsupported_parameter``, the field named), never dropped: a client that asked for a JSON
schema must not get free text with a 200. Each field is accepted at its *neutral* value,
the one that asks for nothing (``use_beam_search: false``, ``length_penalty: 1``, ...),
because tools send those by default (``vllm bench serve`` sends ``logprobs: null``; guidellm
``stop: null``), and JSON ``null`` always means unset.

Fields the door implements are parsed in ``protocol``; fields no OpenAI server reads are
ignored there, as vLLM ignores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alise.http.errors import bad_request

#: Refused fields, both endpoints: name -> (neutral values, what to say).
REFUSED: dict[str, tuple[tuple, str]] = {
    # OpenAI's own
    "n": ((1,), "n must be 1: one choice per request (send several requests instead)"),
    "best_of": ((1,), "best_of must be 1: one choice per request"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix is not supported"),
    "tools": (([],), "tools are not supported"),
    "functions": (([],), "functions are not supported"),
    "tool_choice": (("none",), "tool_choice is not supported"),
    "function_call": (("none",), "function_call is not supported"),
    "parallel_tool_calls": ((True, False), ""),
    "response_format": (({"type": "text"},), "response_format other than text is not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported (there is no reasoning parser); "
                             "a chat template's own switch goes in chat_template_kwargs"),
    "modalities": ((["text"],), "only text output is supported"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "prediction (predicted outputs) is not supported"),
    # vLLM's sampling parameters
    "use_beam_search": ((False,), "beam search is not supported"),
    "length_penalty": ((1,), "length_penalty (beam search) is not supported"),
    "include_stop_str_in_output": ((False,), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": ((True,), "special tokens are always skipped in the text"),
    "spaces_between_special_tokens": ((True,), "spaces_between_special_tokens is not supported"),
    "truncate_prompt_tokens": ((), "truncate_prompt_tokens is not supported: shorten the prompt"),
    "truncation_side": ((), "truncation_side is not supported"),
    "allowed_token_ids": ((), "allowed_token_ids is not supported"),
    "bad_words": (([],), "bad_words is not supported"),
    "prompt_logprobs": ((), "prompt_logprobs are not supported"),
    "logprob_token_ids": ((), "logprob_token_ids are not supported"),
    "watermarking": ((False,), "watermarking is not supported"),
    "thinking_token_budget": ((-1,), "thinking_token_budget is not supported"),
    "repetition_detection": ((), "repetition_detection is not supported"),
    "stream_interval": ((1,), "stream_interval must be 1: every chunk is sent as it comes"),
    # vLLM's structured outputs (current and older names)
    "structured_outputs": ((), "structured outputs are not supported"),
    "guided_json": ((), "guided decoding (guided_json) is not supported"),
    "guided_regex": ((), "guided decoding (guided_regex) is not supported"),
    "guided_choice": ((), "guided decoding (guided_choice) is not supported"),
    "guided_grammar": ((), "guided decoding (guided_grammar) is not supported"),
    "structural_tag": ((), "structural_tag is not supported"),
    "guided_decoding_backend": ((), "guided decoding is not supported"),
    "guided_whitespace_pattern": ((), "guided decoding is not supported"),
    "logits_processors": ((), "logits_processors are not supported"),
    # vLLM's prompt, template and engine extras
    "prompt_embeds": ((), "prompt_embeds are not supported: send text or token ids"),
    "add_generation_prompt": ((True,), "add_generation_prompt must be true"),
    "continue_final_message": ((False,), "continue_final_message is not supported"),
    "documents": ((), "documents are not supported"),
    "chat_template": ((), "a request's own chat_template is not supported; the served model's is used"),
    "mm_processor_kwargs": (({},), "multimodal inputs are not supported"),
    "media_io_kwargs": (({},), "multimodal inputs are not supported"),
    "include_reasoning": ((True,), "include_reasoning: false is not supported (there is no reasoning parser)"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids (logprobs) is not supported"),
    "return_token_offsets": ((False,), "return_token_offsets is not supported"),
    "return_prompt_text": ((False,), "return_prompt_text is not supported"),
    "return_mm_kwargs": ((True,), "multimodal inputs are not supported"),
    "routed_experts_prompt_start": ((0,), "routed experts are not supported"),
    "kv_transfer_params": ((), "kv_transfer_params (disaggregated serving) are not supported"),
    "ec_transfer_params": ((), "ec_transfer_params (disaggregated serving) are not supported"),
    "vllm_xargs": (({},), "vllm_xargs are not supported"),
}

#: Where an endpoint's neutral value differs (chat: True). vLLM adds special tokens to a
#: completion's prompt (as the scheduler does) but not to a rendered chat, whose template placed
#: them. ``top_logprobs`` is a chat field (a completion's ``logprobs`` is its count); ``logprobs``
#: itself is parsed in ``protocol`` for both.
_BY_ENDPOINT: dict[bool, dict[str, tuple[tuple, str]]] = {
    False: {"add_special_tokens": ((True,), "add_special_tokens must be true for a completion"),
            "top_logprobs": ((0,), "top_logprobs is a chat field; a completion's logprobs is the number "
                                   "of most likely tokens to list")},
    True: {"add_special_tokens": ((False,), "add_special_tokens must be false for a chat (its template "
                                            "places the special tokens)")},
}


def _is_neutral(value: Any, neutral: tuple) -> bool:
    for v in neutral:
        if isinstance(v, bool) or isinstance(value, bool):
            if value is v:
                return True
        elif isinstance(v, (int, float)):
            if isinstance(value, (int, float)) and value == v:
                return True
        elif type(value) is type(v) and value == v:
            return True
    return False


def refuse_unsupported(body: Mapping, *, chat: bool) -> None:
    """Raises ApiError (400, ``unsupported_parameter``) for the first field that asks for
    something the door does not do."""
    by_endpoint = _BY_ENDPOINT[chat]
    for name, value in body.items():
        entry = by_endpoint.get(name) or REFUSED.get(name)
        if entry is None or value is None or _is_neutral(value, entry[0]):
            continue
        message = entry[1] or "not supported"
        raise bad_request(message if message.startswith(name) else f"{name}: {message}", param=name,
                          code="unsupported_parameter")
