"""The door's settings refuse, by name, what no listener or dial could use."""

from __future__ import annotations

import pytest

from alise.cli.main import main
from alise.http.config import HttpConfig


@pytest.mark.parametrize("name", ["address", "scheduler_address", "health_address"])
@pytest.mark.parametrize("port", ["65536", "99999"])
def test_a_port_past_65535_is_refused_naming_the_setting(name, port):
    with pytest.raises(ValueError, match=f"^{name} must look like HOST:PORT, got '127.0.0.1:{port}'$"):
        HttpConfig(**{name: f"127.0.0.1:{port}"})


def test_the_highest_port_is_accepted():
    assert HttpConfig(address="127.0.0.1:65535").address == "127.0.0.1:65535"


def test_alise_http_with_such_a_port_exits_2_without_a_traceback(capsys):
    assert main(["http", "--address", "127.0.0.1:99999"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "no-such-preset"])
def test_a_model_that_is_neither_a_directory_nor_a_preset_is_refused(model):
    # Named on purpose, it must be the template the operator meant: not the plain one instead.
    with pytest.raises(ValueError, match=f"^model: model '{model}' is neither a local model directory nor a preset"):
        HttpConfig(model=model)


def test_a_model_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lacks config.json"):
        HttpConfig(model=str(tmp_path))


def test_a_preset_or_a_model_directory_is_accepted(tiny_llama_dir):
    assert HttpConfig(model="tiny-llama").model == "tiny-llama"
    assert HttpConfig(model=str(tiny_llama_dir)).model == str(tiny_llama_dir)


@pytest.mark.parametrize("token", ["t\u00e9", "a\tb", "a\r"])
def test_a_scheduler_token_no_grpc_header_can_carry_is_refused_at_start(token):
    # The door started, then answered every request 500 (gRPC's "Invalid metadata").
    with pytest.raises(ValueError, match="^scheduler_token holds a character no gRPC header can carry"):
        HttpConfig(scheduler_token=token)
    assert token not in str(pytest.raises(ValueError, HttpConfig, scheduler_token=token).value)  # a secret
