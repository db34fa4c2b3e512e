"""A huge token-id prompt sent while other streams run, against a real CPU cluster (`alise up`).

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
import sys
import time
from pathlib import Path

import grpc
from alise.client import AsyncClient
from alise.v1 import scheduler_pb2
from upcluster import UpCluster, probe_health


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
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]
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
    p.add_argument("--out", default=None)
    args = p.parse_args()
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
    print(f"  {'health checks: sent / failed':<34}{hb['probes']:>14} / {hb['failed']:<3}{hw['probes']:>14} / {hw['failed']:<3}")
    print(f"  {'health check, slowest answer, ms':<34}{hb['max_ms'] or float('nan'):>20.1f}{hw['max_ms'] or float('nan'):>20.1f}")
    print(f"  per stream, before: {fmt(result['gaps_baseline_ms'])}; around: {fmt(result['gaps_window_ms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
