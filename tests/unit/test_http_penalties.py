"""The door parses vLLM's penalties, min_tokens and logit_bias (OpenAI's string token ids), takes
their neutral values and nulls as unset, and refuses a bad one with a 400 naming it."""

from __future__ import annotations

import pytest

from alise.http.errors import ApiError
from alise.http.protocol import parse_request

BODY = {"prompt": "hi", "max_tokens": 8}


def test_the_values_are_parsed():
    req = parse_request({**BODY, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                         "min_tokens": 8, "logit_bias": {"50256": -100, "7": 2.5}}, chat=False)
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty, req.min_tokens) == (0.5, -1, 1.2, 8)
    assert req.logit_bias == {7: 2.5, 50256: -100.0}


@pytest.mark.parametrize("chat", [False, True])
def test_neutral_values_and_nulls_are_unset(chat):
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    for extra in ({"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1, "min_tokens": 0,
                   "logit_bias": {}},
                  {"presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None,
                   "min_tokens": None, "logit_bias": None}):
        req = parse_request({**base, **extra}, chat=chat)
        assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty, req.min_tokens,
                req.logit_bias) == (0, 0, 1, 0, {})


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", -2.01), ("frequency_penalty", 10**400), ("repetition_penalty", -1), ("min_tokens", 1.5),
    ("min_tokens", 9), ("logit_bias", {"-5": 1}), ("logit_bias", {"5": "x"}), ("logit_bias", {"5": True}),
    ("logit_bias", {"99999999999": 1}), ("logit_bias", "5:1"),
])
def test_a_bad_value_is_400_naming_the_field(field, value):
    with pytest.raises(ApiError) as info:
        parse_request({**BODY, field: value}, chat=False)
    assert (info.value.status, info.value.param) == (400, field) and field in info.value.message
