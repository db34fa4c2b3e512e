"""Faults that once went unnoticed, measured on `alise up` (tiny-llama, random weights, CPU).

    python bench/faults.py [--cancels 1000] [--trials 3] [--out faults.json]

* cancels: ``--cancels`` SDK requests, each cancelled at a random moment 0-50 ms after the
  scheduler accepted it (``--concurrency`` at a time), beside four streams that keep the worker stepping. Then, once the
  scheduler holds no job: the jobs the worker still holds (ghosts: nobody will ever read
  them), those a census aborted on sight meanwhile (status, where the scheduler has one), the
  worker's KV blocks in use, and how long an 8-token request takes now.
* SSE disconnects: ``--disconnects`` streamed completions through the HTTP door
  (``--concurrency`` at a time), each dropped by its client (the connection closed) after 1-8
  events or 0-50 ms after its headers, beside four SDK streams that keep the worker stepping.
  Then, as for cancels: the jobs the worker still holds, those a census aborted on sight, the
  KV blocks in use, and the door's count of clients that closed first.
* hung worker: two workers, six long streams; worker-0 is stopped (SIGSTOP). Until the
  scheduler drops it (status no longer lists it) and until every stream that stalled gets a
  token again (its job moved to worker-1). SIGCONT 15 s later, and the ghosts it brings back.
* hung scheduler: the scheduler is stopped (SIGSTOP) with a stream in flight. Until a new SDK
  request (no deadline) fails, sent at once and 3 s into the stop, and until the stream in
  flight breaks (a stream on a channel of the SDK's settings); SIGCONT after 10 s.

`alise up` would kill a stopped service after 3 s (``--hang-timeout``); it is told not to here.
Each wait is capped (``--cap``): "> cap" means it had not happened. To measure another
checkout: PYTHONPATH=OTHER/src python bench/faults.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import httpx

from alise.client import AliseError, AsyncClient
from alise.client.channel import make_aio_channel
from alise.tools.lab.upcluster import UpCluster
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc

#: `alise up` kills a service whose health check goes unanswered for 3 s (and restarts it);
#: these measure what the other services notice themselves, so the stopped one is left alone.
NO_SUPERVISOR_KILL = ("--hang-timeout", "600")


def free_port_block(n: int) -> int:
    """A base port with ``n`` free ports after it."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_jobs(metrics_port: int) -> tuple[int, int]:
    """(jobs, device KV blocks in use) of the worker serving metrics on ``metrics_port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    jobs = sum(float(v) for v in re.findall(r'^alise_worker_jobs\{state="\w+"\} (\S+)$', text, re.M))
    used = re.search(r'^alise_worker_kv_blocks\{state="used"\} (\S+)$', text, re.M)
    return int(jobs), int(float(used.group(1))) if used else -1


async def drain(stream) -> None:
    async for _ in stream:
        pass


async def under_load(client: AsyncClient, storm) -> float:
    """Awaits ``storm`` while four requests at a time keep the worker stepping; its seconds."""
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            await client.complete("keep stepping", max_tokens=32, ignore_eos=True)

    loads = [asyncio.ensure_future(load()) for _ in range(4)]
    started = time.monotonic()
    try:
        await storm
        return time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(*loads)


async def cancels(args) -> dict:
    base = free_port_block(4)
    up = await asyncio.to_thread(UpCluster, "--no-predictor", "--http-address", "", "--metrics-port", str(base),
                                 "--max-num-seqs", "64")
    rng = random.Random(args.seed)
    try:
        async with AsyncClient(up.address) as client:
            await client.complete("warm up", max_tokens=4, ignore_eos=True)
            gate = asyncio.Semaphore(args.concurrency)

            async def cancelled(i: int) -> None:
                async with gate:
                    accepted = asyncio.Event()

                    async def on_accepted() -> None:
                        accepted.set()
                    task = asyncio.ensure_future(drain(client.generate(
                        f"cancel me {i} " * rng.randint(1, 40), max_tokens=200, ignore_eos=True,
                        on_accepted=on_accepted)))
                    await asyncio.wait([task, asyncio.ensure_future(accepted.wait())],
                                       return_when=asyncio.FIRST_COMPLETED)
                    await asyncio.sleep(rng.uniform(0.0, 0.05))
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

            storm_s = await under_load(client, asyncio.gather(*(cancelled(i) for i in range(args.cancels))))
            jobs, used, w = await settled(client, base + 2)
            t = time.monotonic()
            await client.complete("a short one", max_tokens=8, ignore_eos=True)
            short_s = time.monotonic() - t
    finally:
        up.stop()
    return {"cancels": args.cancels, "concurrency": args.concurrency, "storm_s": round(storm_s, 1), "ghosts_left": jobs,
            "ghosts_aborted_on_sight": w.get("num_ghost_jobs"), "worker_blocks_used": used,
            "scheduler_blocks_used": w["num_device_blocks"] - w["num_free_device_blocks"],
            "short_request_s": round(short_s, 3)}


async def sse_disconnects(args) -> dict:
    base = free_port_block(4)
    up = await asyncio.to_thread(UpCluster, "--no-predictor", "--http-address", f"127.0.0.1:{free_port_block(1)}",
                                 "--metrics-port", str(base), "--max-num-seqs", "64")
    url = f"http://{up.services()['http']['listen']['grpc']}"
    rng = random.Random(args.seed)
    dropped = {"after_events": 0, "after_headers": 0, "answered_whole": 0, "errors": []}
    try:
        async with AsyncClient(up.address) as client, \
                httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as http:
            await client.complete("warm up", max_tokens=4, ignore_eos=True)
            gate = asyncio.Semaphore(args.concurrency)

            async def dropped_stream(i: int) -> None:
                body = {"prompt": f"drop me {i} " * rng.randint(1, 40), "max_tokens": 200, "stream": True,
                        "ignore_eos": True}
                leave_after = rng.randint(0, 8)  # 0: a moment after the headers, before any event
                async with gate:
                    try:
                        await drop_after(http, url, body, leave_after, rng.uniform(0.0, 0.05), dropped)
                    except httpx.HTTPError as exc:
                        dropped["errors"].append(type(exc).__name__)

            storm_s = await under_load(client, asyncio.gather(*(dropped_stream(i) for i in range(args.disconnects))))
            jobs, used, w = await settled(client, base + 2)
            door_closed = await asyncio.to_thread(door_disconnects, url)
    finally:
        up.stop()
    return {"disconnects": args.disconnects, "concurrency": args.concurrency, "storm_s": round(storm_s, 1),
            **{k: v for k, v in dropped.items() if k != "errors"}, "errors": len(dropped["errors"]),
            "door_counted": door_closed, "ghosts_left": jobs, "ghosts_aborted_on_sight": w.get("num_ghost_jobs"),
            "worker_blocks_used": used, "scheduler_blocks_used": w["num_device_blocks"] - w["num_free_device_blocks"]}


async def drop_after(http: httpx.AsyncClient, url: str, body: dict, leave_after: int, wait_s: float,
                     dropped: dict) -> None:
    """One streamed completion, its connection closed after ``leave_after`` events (0: ``wait_s``
    after the headers)."""
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if leave_after == 0:
            await asyncio.sleep(wait_s)
            dropped["after_headers"] += 1
            return  # leaving the block closes the connection mid-stream
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data:")
            if seen >= leave_after:
                dropped["after_events"] += 1
                return
    dropped["answered_whole"] += 1


async def settled(client: AsyncClient, metrics_port: int) -> tuple[int, int, dict]:
    """Once the scheduler holds no job (and a census or two later): the worker's jobs and KV
    blocks in use by its own metrics, and its status entry."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = await client.status()
        if s.num_running + s.num_waiting + s.num_paused == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(3.0)
    jobs, used = await asyncio.to_thread(worker_jobs, metrics_port)
    [w] = (await client.status()).workers
    return jobs, used, w


def door_disconnects(url: str) -> int:
    """The door's count of clients that closed their connection first."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    found = re.search(r"^alise_http_client_disconnects_total (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


async def hung_worker(args) -> dict:
    up = await asyncio.to_thread(UpCluster, "--no-predictor", "--http-address", "", *NO_SUPERVISOR_KILL, workers=2)
    try:
        async with AsyncClient(up.address) as client:
            await client.complete("warm up", max_tokens=4, ignore_eos=True)
            arrivals: list[list[float]] = [[] for _ in range(6)]

            async def stream(i: int) -> None:
                async for _ in client.generate(f"long {i}", max_tokens=1500, ignore_eos=True):
                    arrivals[i].append(time.monotonic())

            streams = [asyncio.ensure_future(stream(i)) for i in range(6)]
            while not all(len(a) >= 5 for a in arrivals):
                await asyncio.sleep(0.05)
            pid = up.services()["worker-0"]["pid"]
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                detect, moved, stalled = await watch_move(client, arrivals, stopped, args.cap)
                await asyncio.sleep(max(stopped + 15.0 - time.monotonic(), 0.0))
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(5.0)
            workers = {w["worker_id"]: w for w in (await client.status()).workers}
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    finally:
        up.stop()
    back = workers.get("worker-0", {})
    return {"detected_s": _round(detect), "jobs_moved_s": _round(moved), "stalled_streams": stalled,
            "worker_back": "worker-0" in workers, "ghosts_after_return": back.get("num_ghost_jobs")}


async def watch_move(client: AsyncClient, arrivals: list[list[float]], stopped: float,
                     cap_s: float) -> tuple[float | None, float | None, int]:
    """(seconds until the stopped worker-0 left the status, until every stream that stalled got
    a token again, how many stalled: those with none from 0.5 to 1 s into the stop)."""
    detect = None
    while time.monotonic() - stopped < cap_s:
        now = time.monotonic()
        if detect is None and "worker-0" not in {w["worker_id"] for w in (await client.status()).workers}:
            detect = now - stopped
        if detect is not None and now > stopped + 1.0:
            stalled = [a for a in arrivals if not [t for t in a if stopped + 0.5 < t < stopped + 1.0]]
            if stalled and all(a[-1] > stopped + 1.0 for a in stalled):
                moved = max(min(t for t in a if t > stopped + 1.0) for a in stalled) - stopped
                return detect, moved, len(stalled)
        await asyncio.sleep(0.05)
    return detect, None, -1


async def hung_scheduler(args) -> dict:
    up = await asyncio.to_thread(UpCluster, "--no-predictor", "--http-address", "", *NO_SUPERVISOR_KILL)
    result = {}
    try:
        async with AsyncClient(up.address) as client:
            await client.complete("warm up", max_tokens=4, ignore_eos=True)
            channel = make_aio_channel(up.address)
            call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(scheduler_pb2.GenerateRequest(
                text="in flight", sampling=dict(max_tokens=1500, ignore_eos=True)))
            await call.read()
            pid = up.services()["scheduler"]["pid"]
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()

            async def broken() -> float | None:
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError:
                    return time.monotonic() - stopped
                return None

            async def new_request(after_s: float) -> tuple[float | None, str]:
                await asyncio.sleep(after_s)
                sent = time.monotonic()
                try:
                    await client.complete("sent while stopped", max_tokens=2)
                except AliseError as exc:
                    return time.monotonic() - sent, exc.code.name
                return time.monotonic() - sent, "answered"

            tasks = [asyncio.ensure_future(c) for c in (broken(), new_request(0.0), new_request(3.0))]
            try:
                done, _ = await asyncio.wait(tasks, timeout=args.cap)
            finally:
                os.kill(pid, signal.SIGCONT)
            values = [t.result() if t in done else None for t in tasks]
            for task in tasks:
                task.cancel()
            call.cancel()
            await channel.close()
            result = {"stream_broke_s": _round(values[0]),
                      "new_request_s": _round(values[1] and values[1][0]), "new_request": values[1] and values[1][1],
                      "new_request_3s_in_s": _round(values[2] and values[2][0]),
                      "new_request_3s_in": values[2] and values[2][1]}
    finally:
        up.stop()
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cancels", type=int, default=1000)
    p.add_argument("--disconnects", type=int, default=1000, help="SSE streams dropped by their clients")
    p.add_argument("--concurrency", type=int, default=10, help="cancelled requests in flight at once")
    p.add_argument("--trials", type=int, default=3, help="hung-worker and hung-scheduler trials")
    p.add_argument("--cap", type=float, default=90.0, help="seconds a wait is capped at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("cancels", "sse", "worker", "scheduler"), default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result: dict = {"command": " ".join(sys.argv), "cap_s": args.cap}
    if args.only in (None, "cancels"):
        result["cancels"] = asyncio.run(cancels(args))
    if args.only in (None, "sse"):
        result["sse"] = asyncio.run(sse_disconnects(args))
    if args.only in (None, "worker"):
        result["hung_worker"] = [asyncio.run(hung_worker(args)) for _ in range(args.trials)]
    if args.only in (None, "scheduler"):
        result["hung_scheduler"] = [asyncio.run(hung_scheduler(args)) for _ in range(args.trials)]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result, args.cap)
    return 0


def print_table(result: dict, cap: float) -> None:
    show = lambda v: f"> {cap:g}" if v is None else str(v)  # noqa: E731
    known = lambda v: "n/a" if v is None else str(v)  # noqa: E731  (a tree without censuses)
    if c := result.get("cancels"):
        print(f"\n{c['cancels']} cancels 0-50 ms after acceptance, {c['concurrency']} at a time, in "
              f"{c['storm_s']} s: ghost jobs left on the worker {c['ghosts_left']}, aborted on sight "
              f"{known(c['ghosts_aborted_on_sight'])}; KV blocks in use: "
              f"worker {c['worker_blocks_used']}, scheduler's count {c['scheduler_blocks_used']}; "
              f"an 8-token request then {c['short_request_s']} s")
    if c := result.get("sse"):
        print(f"\n{c['disconnects']} SSE streams through the door dropped by their clients ({c['after_events']} after "
              f"1-8 events, {c['after_headers']} 0-50 ms after the headers, {c['answered_whole']} ended first, "
              f"{c['errors']} errors), {c['concurrency']} at a time, in {c['storm_s']} s; the door counted "
              f"{c['door_counted']}: ghost jobs left on the worker {c['ghosts_left']}, aborted on sight "
              f"{known(c['ghosts_aborted_on_sight'])}; KV blocks in use: worker {c['worker_blocks_used']}, "
              f"scheduler's count {c['scheduler_blocks_used']}")
    if trials := result.get("hung_worker"):
        print(f"\n{'hung worker (SIGSTOP)':<24}{'detected s':>12}{'jobs moved s':>14}{'stalled':>9}"
              f"{'back':>6}{'ghosts after':>14}")
        for t in trials:
            print(f"{'':<24}{show(t['detected_s']):>12}{show(t['jobs_moved_s']):>14}{t['stalled_streams']:>9}"
                  f"{str(t['worker_back']):>6}{known(t['ghosts_after_return']):>14}")
    if trials := result.get("hung_scheduler"):
        print(f"\n{'hung scheduler (SIGSTOP)':<24}{'stream broke s':>16}{'new request s':>15}{'':>14}"
              f"{'3 s in: s':>11}")
        for t in trials:
            print(f"{'':<24}{show(t['stream_broke_s']):>16}{show(t['new_request_s']):>15}"
                  f"{str(t['new_request']):>14}{show(t['new_request_3s_in_s']):>11} {t['new_request_3s_in']}")


if __name__ == "__main__":
    sys.exit(main())
