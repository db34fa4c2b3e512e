"""Huge prompts sent while other streams run, against a real CPU cluster (`alise up`).

With ``--text-chars N``: ``--concurrent`` text prompts of N characters at once (3.9 MB each by
default: under the scheduler's 4M-character cap, far past what the context holds), through the
HTTP door (``--via http``, the default) or the SDK (``--via grpc``), while STREAMS requests
stream and a small completion is sent every 0.2 s. Reported: how long each huge prompt took to
be answered and what it was told, the small requests' latency, and the longest gap between two
chunks of each other stream before and around the huge prompts.

Without it, the token-id prompt below.

STREAMS requests stream long outputs; once they are going, a client sends SENDS requests
(1 s apart, on one channel: the first on a new connection) whose prompt is IDS token ids
(8 million by default, one byte each: 8 MB, under the 16 MiB message limit). Reported: how
long each took to be refused, and what it was told; the longest gap between two chunks of
each other stream before the first was sent and from 0.5 s before it to 2 s after the last;
and the scheduler's health checks (every 20 ms, from a process of their own) in the same two
windows. Then the floor: the same bytes sent the same way to a bare gRPC server (the same
message limit, its own process) that refuses them without reading them.

    python bench/big_prompt.py
    python bench/big_prompt.py --ids 8000000 --streams 8 --out /tmp/big_prompt.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from itertools import pairwise
from pathlib import Path

import grpc

from alise.client import AsyncClient
from alise.tools.lab.checkout import pythonpath
from alise.tools.lab.upcluster import UpCluster, probe_health
from alise.v1 import scheduler_pb2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_id_request(num_ids: int, token_id: int = 5) -> bytes:
    """A GenerateRequest's bytes: its prompt ``num_ids`` copies of ``token_id``, packed."""
    ids = scheduler_pb2.TokenIds(ids=[token_id] * num_ids)
    return scheduler_pb2.GenerateRequest(token_ids=ids).SerializeToString()


async def stream(client: AsyncClient, i: int, max_tokens: int, arrivals: list[float]) -> None:
    async for _ in client.generate(f"a long answer {i}", max_tokens=max_tokens, ignore_eos=True, timeout_s=900):
        arrivals.append(time.time())


async def send_big(address: str, raw: bytes, num_sends: int) -> list[dict]:
    sends = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        await ch.channel_ready()
        generate = ch.unary_stream("/alise.v1.SchedulerService/Generate")
        for _ in range(num_sends):
            sent = time.time()
            try:
                async for _ in generate(raw, timeout=120):
                    pass
                code, details = "OK", ""
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details()
            sends.append(dict(sent=sent, refused_ms=1e3 * (time.time() - sent), code=code, details=details))
            await asyncio.sleep(1.0)
    return sends


def floor_server(ports, stop) -> None:
    """A bare gRPC server with the scheduler's message limit whose Generate refuses at once,
    reading nothing: what moving the bytes alone costs."""
    from alise.common.grpc_server import MAX_MESSAGE_BYTES

    async def serve() -> None:
        async def refuse(request: bytes, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused unread")
            yield b""

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "alise.v1.SchedulerService", {"Generate": grpc.unary_stream_rpc_method_handler(refuse)}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(0)

    asyncio.run(serve())


def max_gap_ms(times: list[float], start: float, end: float) -> float | None:
    """Longest gap between consecutive arrivals, counting the gaps that overlap [start, end]."""
    gaps = [b - a for a, b in pairwise(times) if b >= start and a <= end]
    return 1e3 * max(gaps) if gaps else None


async def run(address: str, args) -> dict:
    raw = token_id_request(args.ids)
    arrivals = [[] for _ in range(args.streams)]
    async with AsyncClient(address) as client:
        tasks = [asyncio.create_task(stream(client, i, args.max_tokens, arrivals[i])) for i in range(args.streams)]
        while min(len(a) for a in arrivals) < 5:
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.baseline_s)
        sends = await send_big(address, raw, args.sends)
        await asyncio.sleep(1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first_sent, last_sent = sends[0]["sent"], sends[-1]["sent"]
    result = dict(bytes=len(raw), sends=sends, baseline=(max(a[4] for a in arrivals), first_sent - 0.5),
                  window=(first_sent - 0.5, last_sent + 2.0))
    result["gaps_baseline_ms"] = [max_gap_ms(a, *result["baseline"]) for a in arrivals]
    result["gaps_window_ms"] = [max_gap_ms(a, *result["window"]) for a in arrivals]
    return result


async def send_text(target: str, text: str, via: str, go: asyncio.Event | None = None) -> dict:
    """One huge text prompt through the door (``target`` its base URL) or the SDK (an address),
    on a connection of its own made before ``go`` (timed from the send: the body encoded, the
    connection up)."""
    import httpx

    if via == "http":
        body = json.dumps({"prompt": text, "max_tokens": 4}).encode()
        async with httpx.AsyncClient(timeout=300) as client:
            await client.get(f"{target}/health")  # the connection, kept alive for the send
            if go is not None:
                await go.wait()
            sent = time.time()
            reply = await client.post(f"{target}/v1/completions", content=body,
                                      headers={"content-type": "application/json"})
        code, details = str(reply.status_code), reply.json().get("error", {}).get("message", "")
        return dict(sent=sent, refused_ms=1e3 * (time.time() - sent), code=code, details=details)
    # Its own connection, as separate clients have (channels to one address share one otherwise).
    channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                         ("grpc.max_send_message_length", 64 << 20)])
    async with AsyncClient(target, channel=channel) as client:
        await channel.channel_ready()
        if go is not None:
            await go.wait()
        sent = time.time()
        try:
            await client.complete(text, max_tokens=4, timeout_s=300)
            code, details = "OK", ""
        except Exception as exc:  # what it was told is the measurement
            code, details = getattr(getattr(exc, "code", None), "name", type(exc).__name__), str(exc)
    return dict(sent=sent, refused_ms=1e3 * (time.time() - sent), code=code, details=details)


async def small_requests(target: str, via: str, until: asyncio.Event, out: list[float]) -> None:
    """A 4-token completion every 0.2 s until ``until``; their latencies in ``out`` (s)."""
    while not until.is_set():
        started = time.time()
        await send_text(target, "a small request", via)
        out.append(time.time() - started)
        await asyncio.sleep(0.2)


def send_all(target: str, num_chars: int, via: str, concurrent: int, go, results) -> None:
    """In a process of its own (building and sending megabytes must not stall the loop that
    times the streams): waits for ``go``, sends ``concurrent`` huge prompts at once."""
    text = ("the quick brown fox jumps over the lazy dog " * (num_chars // 44 + 1))[:num_chars]

    async def main() -> list[dict]:
        ready = asyncio.Event()
        sends = [asyncio.create_task(send_text(target, text, via, ready)) for _ in range(concurrent)]
        await asyncio.sleep(2.0)  # the connections are up
        await asyncio.to_thread(go.wait)
        ready.set()
        return await asyncio.gather(*sends)

    results.put(asyncio.run(main()))


async def run_text(address: str, base_url: str, args) -> dict:
    target = base_url if args.via == "http" else address
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    sender = ctx.Process(target=send_all, args=(target, args.text_chars, args.via, args.concurrent, go, results))
    sender.start()
    arrivals = [[] for _ in range(args.streams)]
    async with AsyncClient(address) as client:
        tasks = [asyncio.create_task(stream(client, i, args.max_tokens, arrivals[i])) for i in range(args.streams)]
        while min(len(a) for a in arrivals) < 5:
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.baseline_s)
        before, during, done = [], [], asyncio.Event()
        await small_requests_for(target, args.via, 1.0, before)
        smalls = asyncio.create_task(small_requests(target, args.via, done, during))
        go.set()
        sends = await asyncio.to_thread(results.get, True, 600)
        sender.join(60)
        await asyncio.sleep(1.0)
        done.set()
        await smalls
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first_sent = min(x["sent"] for x in sends)
    last = max(x["sent"] + x["refused_ms"] / 1e3 for x in sends)
    result = dict(chars=args.text_chars, sends=sends, small_before_ms=[1e3 * x for x in before],
                  small_during_ms=[1e3 * x for x in during],
                  baseline=(max(a[4] for a in arrivals), first_sent - 0.5), window=(first_sent - 0.5, last + 1.0))
    result["gaps_baseline_ms"] = [max_gap_ms(a, *result["baseline"]) for a in arrivals]
    result["gaps_window_ms"] = [max_gap_ms(a, *result["window"]) for a in arrivals]
    return result


async def small_requests_for(target: str, via: str, seconds: float, out: list[float]) -> None:
    done = asyncio.Event()
    task = asyncio.create_task(small_requests(target, via, done, out))
    await asyncio.sleep(seconds)
    done.set()
    await task


def print_text(result: dict, args) -> None:
    fmt = lambda xs: " ".join("-" if x is None else f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"{args.concurrent} text prompts of {args.text_chars} characters at once, via {args.via}, while "
          f"{args.streams} streams run")
    for send in sorted(result["sends"], key=lambda x: x["refused_ms"]):
        print(f"  answered in {send['refused_ms']:.1f} ms: {send['code']} {send['details'][:110]}")
    before, during = result["small_before_ms"], result["small_during_ms"]
    print(f"  {'':<38}{'before':>12}{'around the prompts':>22}")
    print(f"  {'max gap per stream, ms':<38}{max(x or 0 for x in result['gaps_baseline_ms']):>12.0f}"
          f"{max(x or 0 for x in result['gaps_window_ms']):>22.0f}")
    print(f"  {'small requests: n, max ms':<38}{len(before):>6} {max(before, default=0):>5.0f}"
          f"{len(during):>16} {max(during, default=0):>5.0f}")
    print(f"  per stream, before: {fmt(result['gaps_baseline_ms'])}; around: {fmt(result['gaps_window_ms'])}")


def health_in(probes: list, start: float, end: float) -> dict:
    inside = [(lat, status) for sent, lat, status in probes if start <= sent <= end]
    answered = [lat for lat, status in inside if lat is not None]
    return dict(probes=len(inside), failed=len(inside) - len(answered),
                max_ms=1e3 * max(answered) if answered else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=8_000_000, help="token ids in the huge prompt")
    p.add_argument("--streams", type=int, default=8, help="other streams running meanwhile")
    p.add_argument("--max-tokens", type=int, default=2000, help="output tokens each stream asks for")
    p.add_argument("--sends", type=int, default=3, help="huge requests sent, one after another")
    p.add_argument("--baseline-s", type=float, default=3.0, help="seconds of streaming measured before")
    p.add_argument("--up-arg", action="append", default=[], help="extra argument for alise up, repeatable")
    p.add_argument("--text-chars", type=int, default=0, help="send text prompts of this many characters "
                   "instead (3900000: 3.9 MB)")
    p.add_argument("--concurrent", type=int, default=8, help="text prompts sent at once")
    p.add_argument("--via", choices=("http", "grpc"), default="http", help="text prompts through the door or the SDK")
    p.add_argument("--pythonpath", default=None, help="run the cluster from another checkout (DIR/src first on "
                   "its PYTHONPATH): before and after on one machine")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.text_chars:
        http = f"127.0.0.1:{_free_port()}"
        env = None
        if args.pythonpath:
            env = dict(os.environ, PYTHONPATH=pythonpath(args.pythonpath))
        up = UpCluster(*args.up_arg, "--http-address", http, "--http-health-address", f"127.0.0.1:{_free_port()}",
                       env=env)
        try:
            result = asyncio.run(run_text(up.address, f"http://{http}", args))
        finally:
            up.stop()
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        print_text(result, args)
        return 0
    up = UpCluster(*args.up_arg)
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=(up.address, stop, results, 0.02))
    try:
        prober.start()
        result = asyncio.run(run(up.address, args))
        stop.set()
        probes = results.get(timeout=60)
        prober.join(10)
    finally:
        up.stop()
    # The floor: the same bytes, the same way, to a process that refuses them unread.
    ports, done = ctx.Queue(), ctx.Event()
    floor = ctx.Process(target=floor_server, args=(ports, done))
    floor.start()
    try:
        result["floor"] = asyncio.run(send_big(f"127.0.0.1:{ports.get(timeout=60)}",
                                               token_id_request(args.ids), args.sends))
    finally:
        done.set()
        floor.join(10)
    result["health_baseline"] = health_in(probes, *result["baseline"])
    result["health_window"] = health_in(probes, *result["window"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    fmt = lambda xs: " ".join("-" if x is None else f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"huge prompt: {args.ids} token ids ({result['bytes'] / 1e6:.1f} MB), sent {args.sends} times while "
          f"{args.streams} streams run")
    for i, send in enumerate(result["sends"]):
        print(f"  {'new' if i == 0 else 'same'} connection: answered in {send['refused_ms']:.1f} ms: {send['code']} "
              f"{send['details'][:90]}")
    floor_ms = ", ".join(f"{f['refused_ms']:.1f}" for f in result["floor"])
    print(f"  floor (the same bytes to a server that refuses them unread): {floor_ms} ms")
    print(f"  {'':<34}{'before (baseline)':>20}{'around the prompt':>20}")
    print(f"  {'max gap per stream, ms':<34}{max(x or 0 for x in result['gaps_baseline_ms']):>20.0f}"
          f"{max(x or 0 for x in result['gaps_window_ms']):>20.0f}")
    hb, hw = result["health_baseline"], result["health_window"]
    print(f"  {'health checks: sent / failed':<34}{hb['probes']:>14} / {hb['failed']:<3}"
          f"{hw['probes']:>14} / {hw['failed']:<3}")
    print(f"  {'health check, slowest answer, ms':<34}{hb['max_ms'] or float('nan'):>20.1f}"
          f"{hw['max_ms'] or float('nan'):>20.1f}")
    print(f"  per stream, before: {fmt(result['gaps_baseline_ms'])}; around: {fmt(result['gaps_window_ms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
