"""The SDK sends vLLM's penalties, min_tokens and logit_bias, leaves their neutral values unset,
and refuses a bad one by name before any call, by the scheduler's own rules; the CLI passes
its flags through and prints such a refusal in one line."""

from __future__ import annotations

import pytest

from alise.cli.main import main
from alise.client._convert import build_request

ARGS = dict(max_tokens=8, temperature=None, top_p=None, top_k=0, seed=None, stop_token_ids=(),
            ignore_eos=False, request_id="", oracle_output_tokens=0)


def build(**kwargs):
    return build_request("hi", **{**ARGS, **kwargs})


def test_the_values_are_sent():
    sampling = build(presence_penalty=0.5, frequency_penalty=-2, repetition_penalty=1.25, min_tokens=8,
                     logit_bias={7: 100, 3: -0.5}).sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -2, 1.25)
    assert sampling.min_tokens == 8 and dict(sampling.logit_bias) == {7: 100.0, 3: -0.5}


def test_neutral_values_are_left_unset():
    sampling = build(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1, min_tokens=0,
                     logit_bias={}).sampling
    assert not any(sampling.HasField(f) for f in ("presence_penalty", "frequency_penalty", "repetition_penalty"))
    assert sampling.min_tokens == 0 and not sampling.logit_bias


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(presence_penalty=2.5), ValueError, "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(frequency_penalty=-3), ValueError, "frequency_penalty must be in [-2, 2], got -3"),
    (dict(frequency_penalty=10**400), ValueError, "frequency_penalty is out of range"),
    (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty must be finite and > 0, got -1.0"),
    (dict(repetition_penalty="2"), TypeError, "repetition_penalty: "),
    (dict(min_tokens=-2), ValueError, "min_tokens must be an integer >= 0, got -2"),
    (dict(min_tokens=9), ValueError, "min_tokens must be at most max_tokens (8), got 9"),
    (dict(logit_bias={5: 150}), ValueError, "logit_bias of token 5 must be a number in [-100, 100], got 150"),
    (dict(logit_bias={"5": 1}), ValueError, "logit_bias keys must be token ids (integers >= 0), got '5'"),
    (dict(logit_bias={2**31: 1}), ValueError, "logit_bias keys must be in [0, 2147483647], got 2147483648"),
    (dict(logit_bias=[(5, 1.0)]), TypeError, "logit_bias must be a mapping"),
])
def test_a_bad_value_is_named(kwargs, error, message):
    with pytest.raises(error) as info:
        build(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--presence-penalty", "3"], "alise: presence_penalty must be in [-2, 2], got 3.0\n"),
    (["--min-tokens", "5", "--max-tokens", "4"], "alise: min_tokens must be at most max_tokens (4), got 5\n"),
    (["--logit-bias", "7=101"], "alise: logit_bias of token 7 must be a number in [-100, 100], got 101.0\n"),
])
def test_the_cli_flags_reach_the_sdk_checks(capsys, argv, message):
    # 127.0.0.1:9 (discard) is never dialled: each is refused before a call.
    assert main(["generate", "hi", *argv, "--address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == message
