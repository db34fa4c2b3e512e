"""Streamed text: the tokens a job generates, turned into text deltas as they arrive.

Whichever process writes a Generate call's responses to its client fills in their text
(``TextDeltas``): the scheduler's own process, or its client front
(``alise.scheduler.front``) when it has one."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (the tokens of the previous delta plus the unread ones) rather
    than the whole output each time, so word-joining rules see their left context, and
    holds back text that ends in an incomplete character (U+FFFD) until the next token
    completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_limit: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_limit = vocab_limit if vocab_limit is not None else len(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        # Random-weight models can emit ids past the tokenizer's vocabulary: they have no text.
        ids = [t for t in ids if 0 <= t < self.vocab_limit]
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta


class TextDeltas:
    """The ``text`` of one Generate call's responses: each response's token ids as a text
    delta, joined to the text of the tokens a resumed stream's client already has; left
    empty when the request asked for tokens only (``stream_text`` false).

    Made before the request is checked: the client's tokens are decoded at the first
    response, once the checks have bounded them by the context, so a refused request
    decodes nothing (a message may carry millions)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, request) -> None:
        self.want_text = not request.HasField("stream_text") or request.stream_text
        self.detok = IncrementalDetokenizer(tokenizer) if self.want_text else None
        self._resumed = request.resume_token_ids if self.detok is not None else None

    def fill(self, response):
        """``response`` (a GenerateResponse) with its text delta set; returns it."""
        if self.detok is not None:
            if self._resumed:
                self.detok.add(list(self._resumed))
            self._resumed = None
            response.text = self.detok.add(list(response.token_ids))
        return response
