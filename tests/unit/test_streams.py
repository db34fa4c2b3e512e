"""The client streams hand tokens to their handlers off the engine loop, and never ahead of
an event the loop has yet to turn into plans (asyncio only: no gRPC, no worker)."""

from __future__ import annotations

import asyncio

from alise.common.metrics import SchedulerMetrics
from alise.core.commands import TokenEvent
from alise.core.job import FinishReason
from alise.scheduler.messages import Cancel, Inbox
from alise.scheduler.streams import WAKE_SLICE, Streams
from corekit import make_job


async def settled(inbox: Inbox) -> None:
    """Plays the loop: takes what was posted and catches up."""
    await inbox.next_batch(timeout_s=0.01)
    inbox.settle()


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_streams_wake_a_slice_at_a_time_and_wait_while_the_loop_has_work():
    inbox, metrics = Inbox(), SchedulerMetrics()
    streams = Streams(inbox, metrics)
    streams.start()
    opened = [streams.open(make_job(f"j{i}", 4)) for i in range(3 * WAKE_SLICE)]
    await settled(inbox)
    for s in opened:
        s.job.output_token_ids.append(7)
    inbox.post(Cancel("another"))  # a report, say, not applied yet
    streams.deliver([TokenEvent(s.job.job_id, [7], 0, None) for s in opened], 1.0)
    await turns(10)
    assert not any(s.events for s in opened), "woken while the loop had an event to apply"
    await settled(inbox)
    while not any(s.events for s in opened):
        await asyncio.sleep(0)
    inbox.post(Cancel("yet another"))  # arrives after the first slice
    await turns(10)
    assert sum(bool(s.events) for s in opened) == WAKE_SLICE
    await settled(inbox)
    await turns(10)
    assert all(s.events for s in opened)
    streams.fail_all("UNAVAILABLE", "test over")


async def test_streams_go_on_while_reports_keep_coming():
    """A loop that finds a new event waiting at the end of every turn still lets the streams
    through, a slice per turn."""
    inbox = Inbox()
    streams = Streams(inbox, SchedulerMetrics())
    streams.start()
    opened = [streams.open(make_job(f"j{i}", 4)) for i in range(3 * WAKE_SLICE)]
    await settled(inbox)
    streams.deliver([TokenEvent(s.job.job_id, [7], 0, None) for s in opened], 1.0)
    for turn in range(1, 4):
        inbox.post(Cancel("a report"))
        await settled(inbox)
        inbox.post(Cancel("the next report, already in"))
        await turns(3)
        assert sum(bool(s.events) for s in opened) == turn * WAKE_SLICE
    streams.fail_all("UNAVAILABLE", "test over")


async def test_first_tokens_are_counted_as_first_however_late_the_pump_runs():
    """Two reports of one job are applied before the streams' task gets to the first: its
    first token still counts for the time to first token and the prompt's tokens."""
    inbox, metrics = Inbox(), SchedulerMetrics()
    streams = Streams(inbox, metrics)
    streams.start()
    stream = streams.open(make_job("j", 5, max_tokens=8))
    await settled(inbox)
    inbox.post(Cancel("pending"))
    job = stream.job
    job.first_token_s = job.arrival_s + 0.25
    job.output_token_ids += [3, 4]
    streams.deliver([TokenEvent("j", [3], 0, None)], 1.0)
    streams.deliver([TokenEvent("j", [4], 1, None)], 1.1)
    await settled(inbox)
    await turns(5)
    assert [e.index for e in await stream.next_batch()] == [0, 1]
    assert metrics.vllm.ttft._sum.get() == 0.25
    assert metrics.vllm.prompt_tokens._value.get() == 5
    streams.fail_all("UNAVAILABLE", "test over")


async def test_a_finished_jobs_tokens_still_reach_its_stream_when_the_scheduler_stops():
    inbox, metrics = Inbox(), SchedulerMetrics()
    finished = []
    streams = Streams(inbox, metrics, on_finish=finished.append)
    streams.start()
    done, cut = streams.open(make_job("done", 3)), streams.open(make_job("cut", 3))
    await settled(inbox)
    inbox.post(Cancel("pending"))  # the pump holds the tokens back
    streams.deliver([TokenEvent("done", [9], 0, FinishReason.LENGTH)], 1.0)
    assert streams.num_live() == 1  # a finished job's stream leaves at once
    streams.fail_all("UNAVAILABLE", "shutting down")
    assert [type(e).__name__ for e in await done.next_batch()] == ["TokenEvent"]
    assert [type(e).__name__ for e in await cut.next_batch()] == ["JobFailed"]
    assert [j.job_id for j in finished] == ["done"]
