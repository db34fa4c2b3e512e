"""State gauges scraped from the exporter's thread read the service's state on its event loop:
the scheduler core changes there, and a read walking its dicts from another thread while the
loop resized them raised ("dictionary keys changed during iteration") and failed the scrape."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from prometheus_client import generate_latest

from alise.common import metrics as metrics_module
from alise.common.metrics import SchedulerMetrics, running_loop


def jobs_gauge(jobs: dict[str, int], seen_on: list[int] | None = None):
    def read():
        if seen_on is not None:
            seen_on.append(threading.get_ident())
        yield ("alise_jobs", "Jobs on workers by state", ["state"],
               [(["running"], sum(1 for v in jobs.values() if v % 2)), (["paused"], sum(1 for _ in jobs))])
    return read


async def test_a_scrape_from_another_thread_reads_on_the_loop() -> None:
    seen_on: list[int] = []
    metrics = SchedulerMetrics()
    metrics.watch(jobs_gauge({"a": 1, "b": 2}, seen_on), loop=running_loop())
    text = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    assert 'alise_jobs{state="running"} 1.0' in text
    assert 'vllm:num_requests_running 1.0' in text
    assert seen_on == [threading.get_ident()]  # this test's loop thread, not the scraper's


async def test_scrapes_never_see_the_loop_resize_what_they_read() -> None:
    jobs = {f"j{i}": i for i in range(2_000)}
    metrics = SchedulerMetrics()
    metrics.watch(jobs_gauge(jobs), loop=running_loop())
    stop = asyncio.Event()

    async def churn() -> None:  # admits and finishes, as the engine does between awaits
        n = len(jobs)
        while not stop.is_set():
            for _ in range(50):
                jobs[f"j{n}"] = n
                del jobs[next(iter(jobs))]
                n += 1
            await asyncio.sleep(0)

    def scrape_many() -> int:
        return sum(len(generate_latest(metrics.registry)) > 0 for _ in range(100))

    # Threads switch every microsecond: a read walking the dict from the scraper's thread would
    # meet the loop's changes in most scrapes.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    task = asyncio.create_task(churn())
    try:
        assert await asyncio.to_thread(scrape_many) == 100
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        await task


async def test_a_stuck_loop_fails_the_scrape_instead_of_hanging_it(monkeypatch) -> None:
    monkeypatch.setattr(metrics_module, "STATE_READ_TIMEOUT_S", 0.2)
    metrics = SchedulerMetrics()
    metrics.watch(jobs_gauge({"a": 1}), loop=running_loop())
    scraped = asyncio.get_running_loop().run_in_executor(None, generate_latest, metrics.registry)
    stuck = threading.Event()
    threading.Timer(1.0, stuck.set).start()
    stuck.wait()  # the loop blocked past the timeout: the scrape gives up, it does not wait forever
    with pytest.raises(TimeoutError):
        await scraped


def test_without_a_loop_the_read_runs_where_it_is_scraped() -> None:
    seen_on: list[int] = []
    metrics = SchedulerMetrics()
    metrics.watch(jobs_gauge({"a": 1}, seen_on))
    assert 'alise_jobs{state="paused"} 1.0' in generate_latest(metrics.registry).decode()
    assert seen_on == [threading.get_ident()]
