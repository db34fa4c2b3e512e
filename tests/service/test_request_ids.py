"""Request ids are checked before anything logs them, and refusals cannot flood the log:
each case goes through the real SDK and the services' own log handler."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time

import pytest
from cluster_fixtures import cluster

from alise.client import InvalidRequest
from alise.common.logs import make_handler

#: How every line of the services' text log starts.
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ scheduler ")


@pytest.fixture
def service_log():
    """What the scheduler's own text handler writes, while the test runs."""
    buffer = io.StringIO()
    handler = make_handler("scheduler", fmt="text", stream=buffer)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.mark.parametrize("request_id, says", [
    (" ", "request_id is blank"),
    ("\t \n", "request_id is blank"),
    ("a\nb", "request_id must be printable"),
    ("x" * 129, "at most 128 characters"),
    ("\u202eevil", "request_id must be printable"),   # a right-to-left override
])
async def test_bad_request_ids_are_refused(tiny_llama_dir, request_id, says):
    async with cluster(str(tiny_llama_dir), num_workers=0) as c, c.client() as client:
        with pytest.raises(InvalidRequest, match=says):
            await client.complete("hi", max_tokens=2, request_id=request_id)
        assert c.scheduler.streams.num_live() == 0


async def test_a_forged_line_and_a_huge_id_stay_one_short_line(tiny_llama_dir, service_log):
    forged = "x\n2026-01-01 00:00:00,000 INFO scheduler alise.scheduler.service [admin]: granted"
    async with cluster(str(tiny_llama_dir), num_workers=0) as c, c.client() as client:
        for request_id in (forged, "y" * (1 << 20)):
            with pytest.raises(InvalidRequest):
                await client.complete("hi", max_tokens=2, request_id=request_id)
    text = service_log.getvalue()
    lines = text.splitlines()
    assert all(LINE_START.match(line) for line in lines), [line for line in lines if not LINE_START.match(line)]
    refused = [line for line in lines if "refused: INVALID_ARGUMENT" in line]
    assert len(refused) == 2
    assert "\\n2026-01-01" in refused[0]                       # the newline is written as \n
    assert "(1048576 characters)" in refused[1] and len(refused[1]) < 1000


async def test_a_flood_of_refusals_logs_a_bounded_number_of_lines(tiny_llama_dir, service_log):
    """The limiter's contract: 20 lines at once, then 2 a second; every refusal held back is
    counted on a later line."""
    async with cluster(str(tiny_llama_dir), num_workers=0) as c, c.client() as client:
        async def refused(i: int) -> None:
            with pytest.raises(InvalidRequest):
                await client.complete("hi", max_tokens=2, request_id=f"bad\n{i}")
        started = time.monotonic()
        await asyncio.gather(*(refused(i) for i in range(400)))
        await asyncio.sleep(1.0)  # the limiter lets a line through again, and counts what it held
        with pytest.raises(InvalidRequest):
            await client.complete("hi", max_tokens=2, request_id=" ")
        elapsed_s = time.monotonic() - started
    lines = [line for line in service_log.getvalue().splitlines() if "refused:" in line]
    held = [int(n) for line in lines for n in re.findall(r"\(and (\d+) more like it, not logged\)", line)]
    assert len(lines) + sum(held) == 401
    assert 20 < len(lines) <= 20 + 2 * elapsed_s + 1
    assert "request_id is blank" in lines[-1] and held
