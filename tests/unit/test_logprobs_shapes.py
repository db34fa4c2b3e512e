"""The door's logprobs objects, as vLLM's serving shapes them: the sampled token first, then the
most likely others (not repeated); a completion lists k + 1 of them, a chat k; -inf is -9999;
without a tokenizer a token is ``token_id:<id>``; text offsets run on across chunks."""

from __future__ import annotations

import math

from alise.client import TokenLogprobs
from alise.http.logprobs import LogprobShaper, token_texts

TEXTS = {1: "a", 2: "bb", 3: "ccc", 4: "é"}.__getitem__
#: Token 4 sampled, outside the top 2 (1 and 2); token 1 sampled, the most likely.
OUTSIDE = TokenLogprobs(-3.0, (1, 2), (-0.5, -1.0))
INSIDE = TokenLogprobs(-0.5, (1, 2), (-0.5, -1.0))


def test_a_completion_lists_the_sampled_token_and_the_k_most_likely():
    shaper = LogprobShaper(chat=False, num_top=2, text_of=TEXTS)
    out = shaper.shape([4, 1], [OUTSIDE, INSIDE])
    assert out == {"text_offset": [0, 1], "token_logprobs": [-3.0, -0.5], "tokens": ["é", "a"],
                   "top_logprobs": [{"é": -3.0, "a": -0.5, "bb": -1.0}, {"a": -0.5, "bb": -1.0}]}
    assert shaper.shape([2], [INSIDE])["text_offset"] == [2]  # after "é" and "a"


def test_a_streamed_completions_offsets_start_at_the_text_streamed_before():
    # vLLM's: a chunk's first offset is the length of the streamed text so far (" a" is 2).
    shaper = LogprobShaper(chat=False, num_top=0, text_of=TEXTS)
    assert shaper.shape([1], [INSIDE], " a")["text_offset"] == [0]
    assert shaper.shape([2, 3], [INSIDE, INSIDE], " bbccc")["text_offset"] == [2, 4]
    assert shaper.shape([1], [INSIDE], "a")["text_offset"] == [8]


def test_a_completions_logprobs_0_lists_the_sampled_token_alone():
    out = LogprobShaper(chat=False, num_top=0, text_of=TEXTS).shape([4], [TokenLogprobs(-3.0)])
    assert out["top_logprobs"] == [{"é": -3.0}]


def test_a_chat_lists_k_with_the_sampled_token_first():
    out = LogprobShaper(chat=True, num_top=2, text_of=TEXTS).shape([4, 1], [OUTSIDE, INSIDE])
    first, second = out["content"]
    assert first == {"token": "é", "logprob": -3.0, "bytes": [0xC3, 0xA9], "top_logprobs": [
        {"token": "é", "logprob": -3.0, "bytes": [0xC3, 0xA9]}, {"token": "a", "logprob": -0.5, "bytes": [97]}]}
    assert [t["token"] for t in second["top_logprobs"]] == ["a", "bb"]
    assert LogprobShaper(chat=True, num_top=0, text_of=TEXTS).shape([1], [INSIDE])["content"][0]["top_logprobs"] == []


def test_minus_infinity_is_written_minus_9999_and_no_tokenizer_names_ids():
    lp = TokenLogprobs(-math.inf, (7,), (-math.inf,))
    out = LogprobShaper(chat=False, num_top=1, text_of=token_texts(None)).shape([5], [lp])
    assert out["tokens"] == ["token_id:5"] and out["token_logprobs"] == [-9999.0]
    assert out["top_logprobs"] == [{"token_id:5": -9999.0, "token_id:7": -9999.0}]
