"""What the SDK says when the call cannot be made: a bad address, nothing listening, a
request too large to send. Each is checked against a real socket, never a stand-in."""

from __future__ import annotations

import socket

import pytest

from alise.client import AsyncClient, Client, InvalidRequest, Unavailable
from alise.client._peer import describe_wrong_service


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost:", "::1:50051", "host:port"])
def test_an_address_without_a_port_is_refused(address):
    with pytest.raises(ValueError, match="address must be HOST:PORT"):
        Client(address)
    with pytest.raises(ValueError, match="address must be HOST:PORT"):
        AsyncClient(address)


@pytest.mark.parametrize("address", ["[::1]:50051", "unix:/tmp/alise.sock", "dns:///localhost:50051"])
def test_targets_with_a_port_or_a_scheme_are_accepted(address):
    Client(address).close()


def test_nothing_listening_says_what_to_check():
    address = f"127.0.0.1:{closed_port()}"
    with Client(address) as client, pytest.raises(Unavailable) as err:
        client.status(timeout_s=10)
    assert f"no ALISE scheduler answers at {address}: is `alise up` running" in err.value.details
    assert "Connection refused" in err.value.details  # gRPC's own reason stays, after ours


async def test_nothing_listening_says_what_to_check_async():
    address = f"127.0.0.1:{closed_port()}"
    async with AsyncClient(address) as client:
        with pytest.raises(Unavailable, match=f"no ALISE scheduler answers at {address}"):
            async for _ in client.generate("hello", timeout_s=10):
                pass


def test_a_request_over_the_message_limit_is_invalid_before_it_is_sent():
    # Nothing listens: had the SDK tried to send, this would be Unavailable.
    with Client(f"127.0.0.1:{closed_port()}") as client, pytest.raises(InvalidRequest) as err:
        list(client.generate("x" * (17 << 20)))
    assert "the request is 17.0 MiB; the SDK sends at most 16 MiB" in err.value.details


def test_wrong_service_messages_name_what_answered():
    assert "the ALISE predictor (alise.v1.PredictorService)" in describe_wrong_service(
        "h:1", ["alise.v1.PredictorService", "grpc.health.v1.Health"])
    assert "health checks only" in describe_wrong_service("h:1", ["grpc.health.v1.Health"])
    assert "without reflection" in describe_wrong_service("h:1", None)
    assert "a server of foo.Bar" in describe_wrong_service("h:1", ["foo.Bar"])
