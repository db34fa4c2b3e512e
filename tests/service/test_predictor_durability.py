"""The predictor keeps every answered observation: kill -9, restarts, outages, resends, big
inputs, and snapshots that do not stop Predict."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from alise.predictor.client import PredictorClient
from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import Encoder
from alise.predictor.service import start_predictor_server
from alise.scheduler.predictor_link import predictor_functions
from alise.v1 import predictor_pb2, predictor_pb2_grpc


@pytest.fixture(scope="module")
def encoder():
    return Encoder(num_threads=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp_path, address="127.0.0.1:0", **kwargs) -> PredictorConfig:
    return PredictorConfig(address=address, index_dir=str(tmp_path / "index"), model="m1", **kwargs)


async def test_kill_9_loses_no_answered_observation(encoder, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alise.cli.main", "predictor", "serve", "--address", f"127.0.0.1:{port}",
         "--index-dir", str(tmp_path / "index"), "--model", "m1", "--encoder-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = PredictorClient(f"127.0.0.1:{port}")
    try:
        [est] = await client.predict(["Write a haiku about rain"], timeout_s=600)  # the start: a loaded machine is slow
        await client.observe("", 17, prediction_id=est.prediction_id, timeout_s=30)
        for i in range(19):  # each returns once the predictor says it is durable
            await client.observe(f"Name {i + 2} rivers of Europe", 10 + i, timeout_s=30)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no drain, no final snapshot
        proc.wait()
        await client.close()
    server = await start_predictor_server(config(tmp_path), encoder=encoder)
    try:
        history = server.runtime.history
        assert history.num_observations == 20 and history.num_prompts == 20
        assert history.row_of("Write a haiku about rain") is not None
        assert sorted(history.observations()[2].tolist()) == sorted([17, *range(10, 29)])
    finally:
        await server.stop(0.5)


async def test_outbox_buffers_through_an_outage_and_resends_prompts_a_restart_forgot(encoder, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    server = await start_predictor_server(config(tmp_path, address), encoder=encoder)
    predict, outbox = predictor_functions(address)
    try:
        prompts = ["Explain photosynthesis", "Give me three jokes", "Translate 'cat' to German"]
        estimates = await predict(prompts, [3, 4, 5], 30.0)
        assert all(e.prediction_id for e in estimates)
        await server.stop(0.5)  # down: what follows waits in the outbox
        for prompt, est, n in zip(prompts, estimates, (120, 80, 4), strict=True):
            outbox.add(est.prediction_id, prompt, 4, n)
        outbox.add("", "A prompt with no prediction", 5, 33)
        await asyncio.sleep(0.3)
        assert outbox.num_buffered == 4
        # Back, with the history but not the predictions (a restart): the ids are unknown, so
        # the outbox sends those again with their prompts.
        server = await start_predictor_server(config(tmp_path, address), encoder=encoder)
        assert await outbox.flush(60.0)
        history = server.runtime.history
        assert history.num_observations == 4
        assert all(history.row_of(p) is not None for p in [*prompts, "A prompt with no prediction"])
        assert outbox.num_dropped == 0
    finally:
        await outbox.close()
        await server.stop(0.5)


async def test_a_resend_after_a_lost_answer_counts_once(encoder, tmp_path):
    server = await start_predictor_server(config(tmp_path), encoder=encoder)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            message = predictor_pb2.Observation(prompt="Count to ten", output_tokens=20, sequence=7,
                                                sender="scheduler-a")
            for _ in range(2):  # the same observation on two streams, as after a broken one
                replies = [r async for r in stub.Observe(iter([message]), timeout=30)]
                assert replies[-1].num_accepted == 1 and replies[-1].durable_sequence == 7
        assert server.runtime.history.num_observations == 1
    finally:
        await server.stop(0.5)
    again = await start_predictor_server(config(tmp_path), encoder=encoder)
    try:  # the ids survive a restart (in the log's first record)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{again.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            [reply] = [r async for r in stub.Observe(iter([message]), timeout=30)]
        assert reply.num_accepted == 1 and again.runtime.history.num_observations == 1
    finally:
        await again.stop(0.5)


async def test_predict_answers_while_a_snapshot_is_written(encoder, tmp_path):
    server = await start_predictor_server(config(tmp_path), encoder=encoder)
    client = PredictorClient(f"127.0.0.1:{server.port}")
    try:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((60_000, encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        history = server.runtime.history
        rows = history.add_prompts([f"stored prompt {i}" for i in range(len(vectors))], vectors,
                                   [4] * len(vectors))
        history.add_observations(rows, ["m1"] * len(rows), [50] * len(rows))
        server.runtime.estimator.sync()
        await client.predict(["warm up"], timeout_s=60)
        snapshot = asyncio.create_task(server.runtime.snapshot())  # ~90 MB of vectors to write
        await asyncio.sleep(0)
        answered_during = 0
        while not snapshot.done():
            await client.predict(["Is this answered during the snapshot?"], timeout_s=60)
            answered_during += not snapshot.done()
        await snapshot
        assert answered_during >= 1
    finally:
        await client.close()
        await server.stop(0.5)


async def test_a_huge_prompt_is_stored_as_the_encoder_saw_it(encoder, tmp_path):
    server = await start_predictor_server(config(tmp_path), encoder=encoder)
    client = PredictorClient(f"127.0.0.1:{server.port}")
    huge = "Tell me everything about the sea. " * 300_000  # 10 MB
    try:
        for n in (400, 410, 420):
            [est] = await client.predict([huge], timeout_s=60)
            await client.observe("", n, prediction_id=est.prediction_id, timeout_s=60)
        history = server.runtime.history
        assert history.num_prompts == 1 and history.num_observations == 3
        stored = history.texts[0]
        assert huge.startswith(stored) and len(stored) < 2_000  # 254 tokens' worth
        [again] = await client.predict([huge], timeout_s=60)
        assert again.source == "knn"  # matched by the whole text's key, not the stored prefix
        assert (await client.predict([stored], timeout_s=60))[0].source != "knn"
        await server.runtime.snapshot()
        size = sum(f.stat().st_size for f in (tmp_path / "index").rglob("*") if f.is_file())
        assert size < 200_000
    finally:
        await client.close()
        await server.stop(0.5)


async def test_a_stream_is_read_no_faster_than_its_rate_cap(encoder, tmp_path):
    server = await start_predictor_server(
        config(tmp_path, max_observations_per_s=20.0, max_batch_prompts=10), encoder=encoder)
    try:
        messages = [predictor_pb2.Observation(prompt="Same prompt", output_tokens=i, sequence=i + 1)
                    for i in range(50)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            started = time.monotonic()
            replies = [r async for r in stub.Observe(iter(messages), timeout=60)]
            elapsed = time.monotonic() - started
        assert replies[-1].num_accepted == 50 and replies[-1].durable_sequence == 50
        # A bucket of 10 then 20 a second: the other 40 take at least 2 s, however fast the machine.
        assert elapsed >= 1.9
    finally:
        await server.stop(0.5)


def test_serve_refuses_an_unwritable_index_dir_with_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "alise.cli.main", "predictor", "serve", "--address", "127.0.0.1:0",
         "--index-dir", str(blocker / "index")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "alise predictor serve: error:" in proc.stderr and "not a writable directory" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_resend_racing_the_first_send_counts_once(encoder, tmp_path):
    server = await start_predictor_server(config(tmp_path), encoder=encoder)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            # New prompts need embedding, so both streams are inside Observe at once.
            messages = [predictor_pb2.Observation(prompt=f"Write a limerick about {i} cats", output_tokens=i,
                                                  sequence=i + 1, sender="scheduler-b") for i in range(20)]

            async def send():
                return [r async for r in stub.Observe(iter(messages), timeout=60)]

            first, second = await asyncio.gather(send(), send())
        assert first[-1].num_accepted == second[-1].num_accepted == 20
        assert server.runtime.history.num_observations == 20
    finally:
        await server.stop(0.5)


async def test_a_predictor_with_an_internal_secret_takes_the_schedulers_calls_and_no_others(encoder, tmp_path):
    """The secret is required on every call, the Observe stream included: the scheduler's link
    (which carries it) gets predictions and has its observations stored; a caller without it
    is refused UNAUTHENTICATED."""
    from alise.common.security import SecurityConfig

    secret = SecurityConfig(internal_secret="predictor-s3cret")
    address = f"127.0.0.1:{free_port()}"
    server = await start_predictor_server(config(tmp_path, address, security=secret), encoder=encoder)
    predict, outbox = predictor_functions(address, secret)
    stranger = PredictorClient(address)
    try:
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await stranger.predict(["who am I"], timeout_s=30)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await stranger.observe("who am I", 3, timeout_s=30)
        [estimate] = await predict(["Describe a lighthouse"], [4], 30.0)
        outbox.add(estimate.prediction_id, "Describe a lighthouse", 4, 42)
        assert await outbox.flush(60.0)
        history = server.runtime.history
        assert history.num_observations == 1 and history.row_of("Describe a lighthouse") is not None
    finally:
        await outbox.close()
        await stranger.close()
        await server.stop(0.5)
