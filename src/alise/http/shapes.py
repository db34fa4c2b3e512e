"""The JSON objects of OpenAI's completion and chat-completion responses, whole and streamed.

Extensions, only when the request asked for them: ``token_ids`` on each choice
(``return_token_ids``, as vLLM names it) and an ``alise`` object on the last chunk or the whole
response (``alise_stats``): the scheduler's length estimate and the request's queue and
preemption facts.

With logprobs asked, each choice's ``logprobs`` is its tokens' (``alise.http.logprobs``), in a
whole response all of them, in a streamed chunk that chunk's; null otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from alise.client import Estimate, TokenLogprobs, Usage
from alise.http.logprobs import LogprobShaper

#: The SDK's finish reasons -> OpenAI's ("abort" is vLLM's word for a request the server ended).
FINISH_REASONS = {"stop": "stop", "length": "length", "aborted": "abort"}


@dataclass
class Facts:
    """What the door learned about a request while relaying it."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimate: Estimate | None = None
    usage: Usage | None = None   # the scheduler's, when the stream ran to its end
    stopped_by_string: bool = False   # the door ended it on a stop string

    def openai_usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def alise(self) -> dict:
        e, u = self.estimate, self.usage
        return {
            "request_id": self.request_id,
            "estimate": None if e is None else {"mean": e.mean, "p50": e.p50, "p90": e.p90, "source": e.source},
            # None when a stop string ended the request before the scheduler's own summary.
            "queued_s": None if u is None else u.queued_s,
            "num_preemptions": None if u is None else u.num_preemptions,
            "ttft_s": None if u is None else u.ttft_s,
            "e2e_s": None if u is None else u.e2e_s,
        }


class Shaper:
    """Builds one request's response objects (completion or chat, streamed or whole)."""

    def __init__(self, *, chat: bool, request_id: str, model: str, return_token_ids: bool,
                 alise_stats: bool, logprobs: LogprobShaper | None = None) -> None:
        self.chat = chat
        self.logprobs = logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.return_token_ids = return_token_ids
        self.alise_stats = alise_stats

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, text: str, token_ids: list[int], finish_reason: str | None, *, whole: bool,
                logprobs: list[TokenLogprobs] | None) -> dict:
        choice = self._text_choice(text, finish_reason, whole=whole)
        if self.logprobs is not None:
            choice["logprobs"] = self.logprobs.shape(token_ids, logprobs or [], None if whole else text)
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _text_choice(self, text: str, finish_reason: str | None, *, whole: bool) -> dict:
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        elif whole:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish_reason}
        return choice

    def whole(self, text: str, token_ids: list[int], finish_reason: str, facts: Facts,
              logprobs: list[TokenLogprobs] | None = None) -> dict:
        obj = self._envelope("chat.completion" if self.chat else "text_completion",
                             [self._choice(text, token_ids, finish_reason, whole=True, logprobs=logprobs)])
        obj["usage"] = facts.openai_usage()
        if self.alise_stats:
            obj["alise"] = facts.alise()
        return obj

    def role_chunk(self, include_usage: bool) -> dict:
        """The first event of a streamed chat completion: who speaks (sent when the scheduler
        accepts the request, before its prompt's token count is known: usage is null)."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        obj = self._envelope("chat.completion.chunk", [choice])
        if include_usage:
            obj["usage"] = None
        return obj

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None, facts: Facts,
              include_usage: bool, continuous_usage: bool = False,
              logprobs: list[TokenLogprobs] | None = None) -> dict:
        """One streamed chunk; with ``continuous_usage`` (vLLM's continuous_usage_stats) it
        carries the usage so far, else null when usage was asked for (OpenAI's shape)."""
        obj = self._envelope("chat.completion.chunk" if self.chat else "text_completion",
                             [self._choice(text, token_ids, finish_reason, whole=False, logprobs=logprobs)])
        if continuous_usage:
            obj["usage"] = facts.openai_usage()
        elif include_usage:
            obj["usage"] = None
        if finish_reason is not None and self.alise_stats:
            obj["alise"] = facts.alise()
        return obj

    def usage_chunk(self, facts: Facts) -> dict:
        obj = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        obj["usage"] = facts.openai_usage()
        return obj


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
