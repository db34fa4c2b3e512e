"""PredictorService fuzzed with generated messages: clear statuses, the service stays healthy."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alise.predictor.config import PredictorConfig
from alise.predictor.service import start_predictor_server
from alise.v1 import predictor_pb2, predictor_pb2_grpc
from protofuzz import messages

CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def address():
    ready = threading.Event()
    state = {}

    def run():
        async def main():
            server = await start_predictor_server(PredictorConfig(address="127.0.0.1:0"))
            state["address"] = f"127.0.0.1:{server.port}"
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            await server.stop(0.1)
        state["loop"] = asyncio.new_event_loop()
        state["loop"].run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120)
    yield state["address"]
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(30)


def call(address, fn):
    with grpc.insecure_channel(address) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        try:
            fn(stub)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            assert exc.details(), "an error without a message"
            return exc.code()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=messages(predictor_pb2.PredictRequest))
def test_predict_fuzzed(address, request):
    code = call(address, lambda stub: stub.Predict(request, timeout=10))
    assert code in CLEAR, f"{code}: {request}"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=st.lists(messages(predictor_pb2.Observation), max_size=5))
def test_observe_fuzzed(address, stream):
    code = call(address, lambda stub: list(stub.Observe(iter(stream), timeout=10)))
    assert code in CLEAR, f"{code}: {stream}"


def test_healthy_after_fuzzing(address):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stats = predictor_pb2_grpc.PredictorServiceStub(channel).GetStats(predictor_pb2.GetStatsRequest(), timeout=5)
        out = predictor_pb2_grpc.PredictorServiceStub(channel).Predict(
            predictor_pb2.PredictRequest(prompts=["still fine?"]), timeout=10)
    assert stats.embedding_dim > 0 and len(out.predictions) == 1
