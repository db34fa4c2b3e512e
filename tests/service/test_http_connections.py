"""Connections that send nothing, or trickle, hold no one else up: header and body timeouts,
the header size bound, idle connections per client, and room made at the connection limit by
closing idle ones. Attackers connect from other loopback addresses (127.0.0.2, ...), users
from 127.0.0.1, as from other hosts."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from alise.http.config import HttpConfig
from alise.http.connections import MIN_IDLE_S, SWEEP_S
from alise.http.server import start_http
from alise.scheduler.config import SchedulerConfig
from alise.scheduler.service import start_scheduler


@pytest.fixture()
async def door_factory():
    started = []

    async def make(**overrides):
        scheduler = await start_scheduler(SchedulerConfig(address="127.0.0.1:0", model="tiny-llama",
                                                          max_wait_no_worker_s=30))
        http = await start_http(HttpConfig(address="127.0.0.1:0", scheduler_address=f"127.0.0.1:{scheduler.port}",
                                           health_interval_s=0.05, **overrides))
        started.append((scheduler, http))
        return http

    yield make
    for scheduler, http in started:
        await http.stop(0.2)
        await scheduler.stop(0.1)


async def connect(http, source: str = "127.0.0.1", send: bytes = b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port, local_addr=(source, 0))
    if send:
        writer.write(send)
        await writer.drain()
    return reader, writer


async def answer(reader, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout_s)


async def test_a_connection_that_sends_nothing_gets_408_and_is_closed(door_factory):
    http = await door_factory(header_timeout_s=0.3)
    reader, writer = await connect(http)
    started = time.monotonic()
    reply = await answer(reader)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3 s" in reply
    assert 0.25 < time.monotonic() - started < 2.0
    writer.close()


async def test_headers_that_trickle_in_are_cut_at_the_header_timeout(door_factory):
    http = await door_factory(header_timeout_s=0.5)
    reader, writer = await connect(http, send=b"GET /health HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()

    async def trickle() -> None:  # a header byte every 0.1 s: never complete
        for _ in range(30):
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle())
    reply = await answer(reader)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 1.5
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()


async def test_headers_over_the_size_bound_are_431(door_factory):
    http = await door_factory(max_header_bytes=8192)
    reader, writer = await connect(http, send=b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
    assert (await answer(reader)).startswith(b"HTTP/1.1 431")
    writer.close()
    async with httpx.AsyncClient(base_url=http.base_url) as client:  # a normal request is fine
        assert (await client.get("/health", headers={"x-small": "a" * 1000})).status_code == 200


async def test_a_body_that_trickles_in_gets_408(door_factory):
    http = await door_factory(body_timeout_s=0.3)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    reader, writer = await connect(http, send=head + b'{"prompt": ')
    reply = await asyncio.wait_for(reader.read(4096), 5)
    assert reply.startswith(b"HTTP/1.1 408") and b"request body did not arrive within 0.3 s" in reply
    writer.close()


async def test_a_client_over_its_idle_connections_loses_its_oldest(door_factory):
    http = await door_factory(max_idle_connections_per_client=4, header_timeout_s=30)
    guard = http.uvicorn.config.http_protocol_class.guard
    first = [await connect(http, "127.0.0.2") for _ in range(6)]
    assert guard.idle_by_client["127.0.0.2"] == 6  # fresh ones are never cut
    await asyncio.sleep(MIN_IDLE_S + SWEEP_S + 0.3)
    # The sweep closed the two idle longest, leaving the client its 4.
    assert [i for i, (reader, _) in enumerate(first) if await _closed(reader)] == [0, 1]
    assert guard.idle_by_client["127.0.0.2"] == 4
    later = await connect(http, "127.0.0.2")  # one more closes the oldest at once
    assert await _closed(first[2][0]) and guard.idle_by_client["127.0.0.2"] == 4
    async with httpx.AsyncClient(base_url=http.base_url) as client:
        assert (await client.get("/health")).status_code == 200
    for _, writer in first + [later]:
        writer.close()


async def _closed(reader, wait_s: float = 0.5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), wait_s) == b""
    except TimeoutError:
        return False


async def test_at_the_connection_limit_the_idle_make_room_for_requests(door_factory):
    http = await door_factory(max_connections=30, max_idle_connections_per_client=1000, header_timeout_s=30)
    idle = [await connect(http, f"127.0.0.{3 + i % 5}") for i in range(30)]
    async with httpx.AsyncClient(base_url=http.base_url) as client:
        for _ in range(5):
            reply = await client.get("/health")
            assert reply.status_code == 200
    guard = http.uvicorn.config.http_protocol_class.guard
    assert guard.num_closed["evicted"] >= 1
    for _, writer in idle:
        writer.close()


async def test_with_every_connection_busy_a_new_one_gets_503(door_factory):
    http = await door_factory(max_connections=3)
    body = b'{"prompt": "queued", "max_tokens": 2, "stream": true}'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    streams = [await connect(http, send=head + body) for _ in range(3)]
    for reader, _ in streams:  # accepted and queued (no worker): each holds its connection
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    reader, writer = await connect(http)
    reply = await answer(reader)
    assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
    for _, w in streams + [(reader, writer)]:
        w.close()


async def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(door_factory, caplog):
    http = await door_factory()
    with caplog.at_level(logging.INFO):
        for _ in range(100):
            reader, writer = await connect(http, send=b"\x00\x01 not http\r\n\r\n")
            assert (await answer(reader)).startswith(b"HTTP/1.1 400")
            writer.close()
    lines = [r for r in caplog.records if "Invalid HTTP request" in r.getMessage()]
    assert 1 <= len(lines) <= 25 and not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("request_bytes", [
    b"\x00\x01 not http\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
])
async def test_a_request_that_is_not_http_gets_the_openai_error_body(door_factory, request_bytes):
    # uvicorn's own answer was text/plain "Invalid HTTP request received."
    http = await door_factory()
    reader, writer = await connect(http, send=request_bytes)
    head, _, body = (await answer(reader)).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"error": {"message": "the request is not valid HTTP/1.1",
                                          "type": "invalid_request_error", "param": None, "code": "invalid_http"}}


async def read_response(reader, timeout_s: float = 5.0) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one response on a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    return head, await asyncio.wait_for(reader.readexactly(length), timeout_s)


async def test_a_body_longer_than_the_context_admits_is_refused_from_its_length_unread(door_factory):
    http = await door_factory()
    async with httpx.AsyncClient() as client:
        await client.get(f"{http.base_url}/v1/models")  # the door learns the model's context
    limit = http.door.max_body_bytes()
    assert limit < http.door.config.max_body_bytes
    declared = 3_900_000
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared)
    opening = b'{"prompt": "' + b"a" * 1000
    reader, writer = await connect(http, send=head + opening)
    # Answered with 1 KB of the 3.9 MB sent: nothing waits for the rest.
    status, body = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and error["type"] == "invalid_request_error"
    assert f"has {declared} bytes; the limit is {limit}" in error["message"]
    assert "characters of text" in error["message"]
    # The rest of the body is dropped as it comes, not taken for the next request's headers,
    # and the connection serves the next request.
    writer.write(b"a" * (declared - len(opening) - 2) + b'"}')
    writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 200") and b"version" in body
    writer.close()


async def test_a_chunked_body_is_refused_once_its_bytes_pass_the_limit(door_factory):
    http = await door_factory()
    async with httpx.AsyncClient() as client:
        await client.get(f"{http.base_url}/v1/models")
    limit = http.door.max_body_bytes()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * (1 << 16)
    opening = b'{"prompt": "'
    reader, writer = await connect(http, send=head + b"%x\r\n%s\r\n" % (len(opening), opening))
    for _ in range(limit // len(chunk) + 1):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    # Refused with the body still open (no last chunk sent).
    status, body = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 413")
    assert f"exceeds the limit of {limit} bytes" in json.loads(body)["error"]["message"]
    writer.close()


async def test_the_rest_of_a_refused_body_is_bounded_in_time_and_bytes(door_factory):
    http = await door_factory(header_timeout_s=2.0)
    async with httpx.AsyncClient() as client:
        await client.get(f"{http.base_url}/v1/models")
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 << 20))
    slow_reader, slow = await connect(http, send=head + b'{"prompt": "')
    fast_reader, fast = await connect(http, send=head + b'{"prompt": "')
    for reader in (slow_reader, fast_reader):
        assert (await read_response(reader))[0].startswith(b"HTTP/1.1 413")
    # One sends it at once: closed past MAX_DISCARD_BYTES, without waiting for the rest.
    try:
        for _ in range(32):
            fast.write(b"a" * (1 << 20))
            await fast.drain()
        assert await asyncio.wait_for(fast_reader.read(), 5) == b""
    except ConnectionError:
        pass
    # The other trickles the rest of its 64 MB: closed once the header timeout has passed.
    started, closed = time.monotonic(), False
    while not closed and time.monotonic() - started < 8.0:
        try:
            slow.write(b"a" * 100)
            await slow.drain()
            await asyncio.sleep(0.1)
            closed = slow_reader.at_eof()
        except ConnectionError:
            closed = True
    assert closed and time.monotonic() - started < 6.0
    guard = http.uvicorn.config.http_protocol_class.guard
    assert guard.num_closed["discard timeout"] == 1 and guard.num_closed["discard too large"] == 1
    slow.close()
    fast.close()
