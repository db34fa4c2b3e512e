"""A client process for burst tests: connects to ADDRESS, says "ready", waits for a line on
stdin, sends NUM Generate calls at once and a health check, says "fired", and at the end
prints one JSON line: how the calls ended (RESOURCE_EXHAUSTED split by whether it carried a
retry-after hint) and the health check's answer.

    python tests/burst_client.py ADDRESS NUM
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

NUM_CHANNELS = 8


async def one(stub, i: int, tally: Counter) -> None:
    request = scheduler_pb2.GenerateRequest(
        text=f"burst request {i}", sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True))
    try:
        async for _ in stub.Generate(request, timeout=240):
            pass
        tally["completed"] += 1
    except grpc.aio.AioRpcError as exc:
        key = exc.code().name
        if key == "RESOURCE_EXHAUSTED":
            hinted = any(k == "retry-after-ms" for k, _ in exc.trailing_metadata() or ())
            key += " with retry-after" if hinted else " without retry-after"
        tally[key] += 1


async def health(channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def main(address: str, num: int) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(NUM_CHANNELS)]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 60)
    stubs = [scheduler_pb2_grpc.SchedulerServiceStub(ch) for ch in channels]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    tally: Counter = Counter()
    calls = [asyncio.ensure_future(one(stubs[i % NUM_CHANNELS], i, tally)) for i in range(num)]
    checked = asyncio.ensure_future(health(channels[0]))
    await asyncio.sleep(0.5)  # every call has started (sent), none answered while the server is busy
    print("fired", flush=True)
    await asyncio.gather(*calls)
    print(json.dumps({"tally": dict(tally), "health": await checked}), flush=True)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
