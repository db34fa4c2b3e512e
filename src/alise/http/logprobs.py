"""Logprobs in the shapes of vLLM's OpenAI server (its completion and chat serving).

The worker reports, per output token, the sampled token's raw logprob (the log-softmax of the
model's logits, before penalties, bias, temperature and filters: vLLM's default
``logprobs_mode``) and its step's ``k`` most likely tokens. As in vLLM, a token's alternatives
are ranked with the sampled token first, then the most likely others (the sampled one not
repeated): a completion lists the first ``k + 1`` of them as ``{token: logprob}`` (so the
sampled token and the ``k`` most likely, ``k = 0`` the sampled one alone), a chat the first
``k`` as ``[{token, logprob, bytes}]``. A logprob of ``-inf`` is written ``-9999.0`` (JSON has
no infinity), as vLLM writes it.

A token's text is the served model's tokenizer's decoding of it alone. Without that tokenizer
here (the model's directory is on the scheduler's host), a token is named ``token_id:<id>``,
as vLLM's ``return_tokens_as_token_ids`` names it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from alise.client import TokenLogprobs

#: What JSON gets for a logprob of -inf (vLLM's floor).
MIN_LOGPROB = -9999.0


def token_texts(tokenizer) -> Callable[[int], str]:
    """How a token id is written: its decoding alone, or ``token_id:<id>`` without a tokenizer.
    A tokenizer's texts are cached (a request with ``k`` alternatives decodes ``k + 1`` ids a
    token, on the event loop): call this once per tokenizer."""
    if tokenizer is None:
        return lambda token_id: f"token_id:{token_id}"
    return functools.lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id]))


def _ranked(token_id: int, logprobs: TokenLogprobs) -> list[tuple[int, float]]:
    """The sampled token, then the most likely others, each with its logprob (floored)."""
    ranked = [(token_id, logprobs.logprob)]
    ranked += [(t, v) for t, v in zip(logprobs.top_ids, logprobs.top_logprobs, strict=True) if t != token_id]
    return [(t, max(v, MIN_LOGPROB)) for t, v in ranked]


class LogprobShaper:
    """One choice's ``logprobs`` objects, whole or one per streamed chunk. ``num_top``: the
    alternatives asked for (a completion's ``logprobs``, a chat's ``top_logprobs``). A
    completion's ``text_offset`` is vLLM's (no echo): whole, each token's offset is the length
    of the token texts before it; streamed, a chunk's first token is at the length of the text
    streamed before it (``streamed_text``) and the others follow it by their token texts."""

    def __init__(self, *, chat: bool, num_top: int, text_of: Callable[[int], str]) -> None:
        self.chat = chat
        self.num_top = num_top
        self.text_of = text_of
        self.offset = 0
        self.streamed = 0

    def shape(self, token_ids: list[int], logprobs: list[TokenLogprobs], streamed_text: str | None = None) -> dict:
        """``streamed_text``: the text of the streamed chunk these tokens make (None: whole)."""
        if streamed_text is not None:
            self.offset = self.streamed
            self.streamed += len(streamed_text)
        if self.chat:
            return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, logprobs, strict=True)]}
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for token_id, lp in zip(token_ids, logprobs, strict=True):
            ranked = _ranked(token_id, lp)
            token = self.text_of(token_id)
            out["text_offset"].append(self.offset)
            out["token_logprobs"].append(ranked[0][1])
            out["tokens"].append(token)
            out["top_logprobs"].append({self.text_of(t): v for t, v in ranked[:self.num_top + 1]})
            self.offset += len(token)
        return out

    def _chat_entry(self, token_id: int, lp: TokenLogprobs) -> dict:
        ranked = _ranked(token_id, lp)
        entry = self._chat_item(token_id, ranked[0][1])
        entry["top_logprobs"] = [self._chat_item(t, v) for t, v in ranked[:self.num_top]]
        return entry

    def _chat_item(self, token_id: int, logprob: float) -> dict:
        token = self.text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}
