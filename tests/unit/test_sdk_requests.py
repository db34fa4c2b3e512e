"""The SDK builds a request or says which argument it cannot send, and why; the CLI prints that
in one line (exit 2), never a traceback. No server is needed: these are refused before a call."""

from __future__ import annotations

import pytest

from alise.cli.main import main
from alise.client._convert import build_request
from alise.client.channel import channel_credentials

ARGS = dict(max_tokens=4, temperature=None, top_p=None, top_k=0, seed=None, stop_token_ids=(),
            ignore_eos=False, request_id="", oracle_output_tokens=0)


def build(prompt="hi", **kwargs):
    return build_request(prompt, **{**ARGS, **kwargs})


@pytest.mark.parametrize("name, value, range_text", [
    ("max_tokens", 2**40, "[-2147483648, 2147483647]"),
    ("top_k", -2**40, "[-2147483648, 2147483647]"),
    ("seed", -1, "[0, 18446744073709551615]"),
    ("seed", 2**64, "[0, 18446744073709551615]"),
    ("oracle_output_tokens", 2**31, "[-2147483648, 2147483647]"),
    ("stop_token_ids", [5, 2**40], "[-2147483648, 2147483647]"),
])
def test_an_integer_out_of_its_fields_range_is_named(name, value, range_text):
    with pytest.raises(ValueError) as info:
        build(**{name: value})
    assert str(info.value) == f"{name} must be in {range_text}, got {value if name != 'stop_token_ids' else 2**40}"


def test_prompt_token_ids_out_of_range_are_named_as_the_prompt():
    with pytest.raises(ValueError) as info:
        build([1, 2**40])
    assert str(info.value) == "prompt token ids must be in [-2147483648, 2147483647], got 1099511627776"


@pytest.mark.parametrize("name, value", [("max_tokens", "5"), ("temperature", "x"), ("top_p", [1]),
                                         ("seed", 1.5)])
def test_a_value_of_the_wrong_type_is_named(name, value):
    with pytest.raises(TypeError, match=rf"^{name}: "):
        build(**{name: value})


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p"])
def test_a_number_past_any_float_is_named(name):
    with pytest.raises(ValueError, match=rf"^{name} is out of range"):
        build(**{name: 10**400})


@pytest.mark.parametrize("prompt", [b"bytes", None, 5, [1, "a"]])
def test_a_prompt_neither_text_nor_token_ids_is_refused(prompt):
    with pytest.raises(TypeError, match="^prompt must be"):
        build(prompt)


def test_good_values_are_sent():
    req = build([1, 2], seed=2**64 - 1, top_k=5, stop_token_ids=[7], temperature=0.5)
    assert list(build(iter([3, 4])).token_ids.ids) == [3, 4]  # any iterable of ids, read once
    assert (list(req.token_ids.ids), req.sampling.seed, req.sampling.top_k, list(req.sampling.stop_token_ids),
            req.sampling.temperature) == ([1, 2], 2**64 - 1, 5, [7], 0.5)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_tls_file_is_a_value_error_naming_it(tmp_path, kind):
    path = tmp_path / "nope.pem" if kind == "missing" else tmp_path
    with pytest.raises(ValueError, match=f"^cannot read the TLS file {path}: "):
        channel_credentials(str(path))


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--seed", "-1"], "alise: seed must be in [0, 18446744073709551615], got -1\n"),
    (["generate", "hi", "--max-tokens", "99999999999"],
     "alise: max_tokens must be in [-2147483648, 2147483647], got 99999999999\n"),
    (["status", "--tls-ca", "/nonexistent/ca.pem"],
     "alise: cannot read the TLS file /nonexistent/ca.pem: No such file or directory\n"),
    (["health", "--tls-ca", "/nonexistent/ca.pem"],
     "alise: cannot read the TLS file /nonexistent/ca.pem: No such file or directory\n"),
    (["generate", "hi", "--tls-ca", "/nonexistent/ca.pem"],
     "alise: cannot read the TLS file /nonexistent/ca.pem: No such file or directory\n"),
])
def test_the_cli_says_what_is_wrong_in_one_line(capsys, argv, message):
    # 127.0.0.1:9 (discard) is never dialled: each is refused before a call.
    assert main([*argv, "--address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("token", ["\xe9t\xe9", "a\tb", "a\nb"])
def test_a_token_no_grpc_header_can_carry_is_a_value_error(token):
    from alise.client import AsyncClient, Client
    from alise.client._convert import call_metadata

    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="^the token holds a character no gRPC header can carry"):
            make("127.0.0.1:9", token=token)
    with pytest.raises(ValueError, match="^the token holds"):
        call_metadata(token, ())
    assert call_metadata("ok-token", ()) == (("authorization", "Bearer ok-token"),)


@pytest.mark.parametrize("command", [["generate", "hi"], ["status"], ["health"]])
def test_the_cli_refuses_such_a_token_in_one_line(capsys, command):
    assert main([*command, "--token", "a\nb", "--address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith("alise: the token holds a character no gRPC header can carry")


def test_a_prompt_that_is_not_valid_text_is_named():
    # What a shell hands Python for bytes that are not UTF-8 (`alise generate $'\xff'`).
    with pytest.raises(ValueError, match=r"^prompt is not valid Unicode text \(a lone surrogate at character 1\)"):
        build("a\udcff")


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan")])
def test_a_deadline_that_is_no_time_is_refused(timeout_s):
    # 0 ran the call without a deadline; -1 failed it at once with DEADLINE_EXCEEDED.
    import asyncio

    from alise.client import AsyncClient, Client

    with Client("127.0.0.1:9") as client, pytest.raises(ValueError, match=r"^timeout_s must be > 0 seconds"):
        next(client.generate("hi", timeout_s=timeout_s))

    async def agenerate():
        async with AsyncClient("127.0.0.1:9") as client:
            async for _ in client.generate("hi", timeout_s=timeout_s):
                pass

    with pytest.raises(ValueError, match=r"^timeout_s must be > 0 seconds"):
        asyncio.run(agenerate())
