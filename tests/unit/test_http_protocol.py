"""The door's request parsing: bodies a client can send get a 400 that names the field, never
an exception the door did not expect (a 500), and no field asking for something the door does
not do is dropped."""

from __future__ import annotations

import json

import pytest

from alise.http.errors import ApiError
from alise.http.protocol import parse_request

BASE = {False: {"prompt": "hi", "max_tokens": 3},
        True: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}


def refusal(body: dict, *, chat: bool = False) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request({**BASE[chat], **body}, chat=chat)
    return info.value


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("sign", ["", "-"])
def test_a_number_field_past_any_float_is_400_naming_it(field, sign):
    # JSON has integers of any size; 10**400 has no float.
    body = json.loads(f'{{"{field}": {sign}1{"0" * 400}}}')
    error = refusal(body)
    assert (error.status, error.param) == (400, field)
    assert field in error.message and "range" in error.message


def test_a_number_field_that_fits_a_float_is_kept():
    assert parse_request({**BASE[False], "temperature": 10**300}, chat=False).temperature == 1e300


@pytest.mark.parametrize("value, expected", [(None, None), (0, 0), (5, 5), (20, 20)])
def test_a_completions_logprobs_is_the_number_of_most_likely_tokens(value, expected):
    # vLLM's and OpenAI's: logprobs 0 still asks for the sampled tokens' logprobs; null for none.
    assert parse_request({**BASE[False], "logprobs": value}, chat=False).logprobs == expected


@pytest.mark.parametrize("body, expected", [
    ({"logprobs": None}, None), ({"logprobs": False}, None), ({"logprobs": 0}, None),
    ({"logprobs": False, "top_logprobs": 0}, None), ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 3}, 3), ({"logprobs": 1, "top_logprobs": 20}, 20)])
def test_a_chats_logprobs_is_a_boolean_with_top_logprobs(body, expected):
    assert parse_request({**BASE[True], **body}, chat=True).logprobs == expected


@pytest.mark.parametrize("body, chat, param, fragment", [
    ({"logprobs": 21}, False, "logprobs", "logprobs must be in [0, 20], got 21"),
    ({"logprobs": -1}, False, "logprobs", "logprobs must be in [0, 20], got -1"),
    ({"logprobs": True}, False, "logprobs", "logprobs must be an integer"),
    ({"logprobs": 2.5}, False, "logprobs", "logprobs must be an integer"),
    ({"top_logprobs": 2}, False, "top_logprobs", "top_logprobs is a chat field"),
    ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs", "top_logprobs must be in [0, 20], got 21"),
    ({"logprobs": True, "top_logprobs": -1}, True, "top_logprobs", "top_logprobs must be in [0, 20]"),
    ({"top_logprobs": 2}, True, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"logprobs": 2}, True, "logprobs", "logprobs must be a boolean, got 2"),
    ({"logprobs": "yes"}, True, "logprobs", "logprobs must be a boolean"),
])
def test_a_bad_logprobs_is_400_naming_the_field(body, chat, param, fragment):
    error = refusal(body, chat=chat)
    assert (error.status, error.param) == (400, param) and fragment in error.message, error.message


@pytest.mark.parametrize("options", [{"include_usage": "yes"}, {"continuous_usage_stats": 1}])
def test_a_bad_stream_option_is_named_with_its_object(options):
    error = refusal({"stream": True, "stream_options": options})
    [name] = options
    assert error.param == f"stream_options.{name}"
    assert error.message.startswith(f"stream_options.{name} must be a boolean")


@pytest.mark.parametrize("chat", [False, True])
def test_a_whole_number_written_as_a_float_is_that_integer_and_a_fraction_is_400(chat):
    assert parse_request({**BASE[chat], "max_tokens": 5.0}, chat=chat).max_tokens == 5
    error = refusal({"max_tokens": 5.5}, chat=chat)
    assert (error.status, error.param) == (400, "max_tokens")
    assert "integer" in error.message


def test_an_assistant_turn_with_null_content_is_an_empty_turn_and_other_roles_still_need_content():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    request = parse_request({"messages": messages, "max_tokens": 3}, chat=True)
    assert [m["content"] for m in request.messages] == ["hi", "", "again"]
    error = refusal({"messages": [{"role": "user", "content": None}]}, chat=True)
    assert (error.status, error.param) == (400, "messages[0].content")


def test_a_negative_seed_maps_as_torch_maps_it_and_one_past_torchs_range_is_400():
    import torch

    for seed in (-1, -7, -(2**63)):
        mapped = parse_request({**BASE[False], "seed": seed}, chat=False).seed
        assert 0 <= mapped < 2**64
        assert mapped == torch.Generator().manual_seed(seed).initial_seed()
    assert parse_request({**BASE[False], "seed": 2**64 - 1}, chat=False).seed == 2**64 - 1
    error = refusal({"seed": -(2**63) - 1})
    assert (error.status, error.param) == (400, "seed")
