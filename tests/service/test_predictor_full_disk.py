"""A predictor whose write-ahead log cannot be written (a full disk) takes nothing and says so;
the sender's resend, once the disk has room, is taken once and survives a restart."""

from __future__ import annotations

import resource

import grpc
import pytest

from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.predictor.wal import segment_numbers, segment_path
from alise.v1 import predictor_pb2, predictor_pb2_grpc


@pytest.fixture(scope="module")
def encoder():
    return Encoder(num_threads=2)


async def observe(port: int, message) -> list:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        return [r async for r in stub.Observe(iter([message]), timeout=30)]


async def test_an_observation_the_log_cannot_take_is_not_taken_and_its_resend_counts_once(
        encoder, tmp_path, file_size_limit):
    config = PredictorConfig(address="127.0.0.1:0", index_dir=str(tmp_path / "index"), model="m1")
    server = await start_predictor_server(config, encoder=encoder)
    first = predictor_pb2.Observation(prompt="Count to ten", output_tokens=20, sequence=1, sender="s")
    second = predictor_pb2.Observation(prompt="Name three rivers", output_tokens=9, sequence=2, sender="s")
    try:
        assert (await observe(server.port, first))[-1].num_accepted == 1
        [number] = segment_numbers(tmp_path / "index")
        file_size_limit(segment_path(tmp_path / "index", number).stat().st_size + 16)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await observe(server.port, second)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not durable" in refused.value.details()
        assert server.runtime.history.num_observations == 1  # nothing taken
        file_size_limit(resource.RLIM_INFINITY)
        assert (await observe(server.port, second))[-1].num_accepted == 1
        assert server.runtime.history.num_observations == 2
    finally:
        await server.stop(0.5)
    again = await start_predictor_server(config, encoder=encoder)
    try:  # the log replays whole
        assert sorted(again.runtime.history.observations()[2].tolist()) == [9, 20]
    finally:
        await again.stop(0.5)


async def test_a_predictor_started_on_a_full_disk_predicts_and_takes_observations_once_there_is_room(
        encoder, tmp_path, file_size_limit):
    config = PredictorConfig(address="127.0.0.1:0", index_dir=str(tmp_path / "index"), model="m1")
    message = predictor_pb2.Observation(prompt="Count to ten", output_tokens=20, sequence=1, sender="s")
    file_size_limit(1)  # no record fits: its log cannot even start
    server = await start_predictor_server(config, encoder=encoder)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            reply = await stub.Predict(predictor_pb2.PredictRequest(prompts=["Count to ten"]), timeout=30)
            assert len(reply.predictions) == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await observe(server.port, message)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        file_size_limit(resource.RLIM_INFINITY)
        assert (await observe(server.port, message))[-1].num_accepted == 1
    finally:
        await server.stop(0.5)
    again = await start_predictor_server(config, encoder=encoder)
    try:
        assert again.runtime.history.observations()[2].tolist() == [20]
    finally:
        await again.stop(0.5)
