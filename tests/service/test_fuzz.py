"""Every RPC fuzzed with generated messages: each gets a clear status, the server stays healthy.

The cluster (scheduler + one real worker) runs in a background thread's event loop; the
fuzzing side speaks raw gRPC so it can send exactly the generated message.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from cluster_fixtures import cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alise.client import Client
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from protofuzz import messages

CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
         grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.CANCELLED}


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    ready = threading.Event()
    state = {}

    def run():
        async def main():
            async with cluster(str(tiny_llama_dir), max_model_len=256,
                               worker_overrides={"max_model_len": 256, "block_size": 8}) as c:
                state["cluster"] = c
                state["stop"] = asyncio.Event()
                ready.set()
                await state["stop"].wait()
        state["loop"] = asyncio.new_event_loop()
        state["loop"].run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60)
    c = state["cluster"]
    yield c
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(30)


def assert_healthy(c) -> None:
    address = c.address
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    worker = c.workers[0][0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if worker.engine.allocator.num_free == worker.engine.allocator.num_blocks and \
                len(c.scheduler.engine.links) == 1:
            break
        time.sleep(0.05)
    assert worker.engine.allocator.num_free == worker.engine.allocator.num_blocks, "blocks leaked"
    with Client(address) as client:
        out = client.complete("after the storm", max_tokens=3, ignore_eos=True, timeout_s=30)
    assert len(out.token_ids) == 3


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=messages(scheduler_pb2.GenerateRequest))
def test_generate_fuzzed(live, request):
    if request.HasField("sampling") and request.sampling.HasField("max_tokens"):
        request.sampling.max_tokens = min(request.sampling.max_tokens, 64)  # keep valid runs short
    with grpc.insecure_channel(live.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        try:
            for _ in stub.Generate(request, timeout=2.0):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details(), "an error without a message"
    assert code in CLEAR, f"{code}: {request}"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=st.lists(messages(worker_pb2.WorkerMessage), min_size=1, max_size=5))
def test_worker_stream_fuzzed(live, stream):
    with grpc.insecure_channel(live.worker_address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        try:
            for _ in stub.Connect(iter(stream), timeout=1.5):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code in CLEAR, f"{code}: {stream}"


def test_oversize_and_garbage_bytes(live):
    with grpc.insecure_channel(live.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        generate = channel.unary_stream("/alise.v1.SchedulerService/Generate")
        with pytest.raises(grpc.RpcError) as info:
            list(generate(b"\x12" + b"\xff" * 10, timeout=5))      # not a valid message
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be parsed" in info.value.details()
        bad_utf8 = b"\x12\x03\xff\xfe\xfd"                       # field 2 (text): invalid UTF-8
        with pytest.raises(grpc.RpcError) as info:
            list(generate(bad_utf8, timeout=5))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        huge = scheduler_pb2.GenerateRequest(text="x" * (20 << 20)).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(generate(huge, timeout=10))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(live.worker_address) as channel:
        connect = channel.stream_stream("/alise.v1.WorkerService/Connect")
        with pytest.raises(grpc.RpcError) as info:
            list(connect(iter([b"\x0a\x02\xff\xff"]), timeout=5))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert_healthy(live)


def test_server_healthy_after_fuzzing(live):
    assert_healthy(live)


def _valid_hello(worker_id: str) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(hello=worker_pb2.WorkerHello(
        worker_id=worker_id, model="x", block_size=16, num_device_blocks=64, max_model_len=256,
        max_num_seqs=8, max_num_batched_tokens=512))


@pytest.mark.parametrize("report", [
    worker_pb2.StepReport(step_id=99),                                            # out of step
    worker_pb2.StepReport(step_id=0, step_duration_s=-1.0),                       # negative duration
    worker_pb2.StepReport(step_id=0, step_duration_s=float("nan")),               # NaN
    worker_pb2.StepReport(step_id=0, outputs=[worker_pb2.JobOutput(job_id="ghost", token_ids=[1],
                                                                   finish_reason=77)]),  # unknown enum
], ids=["wrong-step", "negative", "nan", "unknown-enum"])
def test_worker_sending_nonsense_reports_is_disconnected(live, report):
    def messages():
        yield _valid_hello("liar")
        time.sleep(0.3)  # let the welcome plan (step 0) arrive first
        yield worker_pb2.WorkerMessage(report=report)
        time.sleep(1.0)

    received = []
    with grpc.insecure_channel(live.worker_address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        try:
            for msg in stub.Connect(messages(), timeout=5):
                received.append(msg)
        except grpc.RpcError as exc:
            assert exc.code() in CLEAR, exc
    kinds = [m.WhichOneof("kind") for m in received]
    assert kinds[0] == "plan" and kinds[-1] == "shutdown", kinds
    assert "protocol error" in received[-1].shutdown.reason
    assert_healthy(live)
