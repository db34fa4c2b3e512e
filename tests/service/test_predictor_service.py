"""PredictorService in-process on port 0, through the real client and raw channel calls."""

import asyncio
import gzip
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alise.predictor.client import PredictorClient, PredictorUnavailable
from alise.predictor.config import PredictorConfig
from alise.predictor.encoder import MIN_SHARD_TOKENS, Encoder
from alise.predictor.runtime import ObservationIn
from alise.predictor.service import start_predictor_server
from alise.predictor.snapshot import SnapshotError
from alise.v1 import predictor_pb2, predictor_pb2_grpc

TOPICS = [("Write a one-word answer: what color is the sky", 2), ("Write a long detailed essay about", 400)]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(num_threads=2)  # the default: int8


@pytest.fixture
def bootstrap_file(tmp_path):
    path = tmp_path / "tiny.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(30):
            for model, scale in (("m1", 1), ("m2", 2)):
                prompt, words = TOPICS[i % 2]
                f.write(json.dumps({"id": i, "instruction": f"{prompt} (item {i})",
                                    "output": "word " * (words * scale), "generator": model}) + "\n")
    return str(path)


@pytest.fixture
async def server(encoder, bootstrap_file, tmp_path):
    config = PredictorConfig(address="127.0.0.1:0", index_dir=str(tmp_path / "index"), model="m1",
                             bootstrap=(bootstrap_file,), refit_after_observations=5,
                             max_prompts_per_request=300)
    srv = await start_predictor_server(config, encoder=encoder)
    yield srv
    await srv.stop(0.5)


@pytest.fixture
async def client(server):
    c = PredictorClient(f"127.0.0.1:{server.port}")
    yield c
    await c.close()


async def assert_healthy(port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="alise.v1.PredictorService"), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_predict_ranks_short_and_long_prompts(client):
    short, long = await client.predict(["Write a one-word answer: what color is grass",
                                        "Write a long detailed essay about the ocean"], timeout_s=10)
    assert short.p50 < long.p50 and short.p50 <= short.p90
    assert long.source in {"blend", "head", "knn"}


async def test_concurrent_predicts_are_batched_and_all_answered(client, server):
    prompts = [f"Write a long detailed essay about topic {i}" for i in range(20)]
    results = await asyncio.gather(*(client.predict([p], timeout_s=10) for p in prompts))
    assert all(len(r) == 1 for r in results)
    assert server.runtime.num_predictions >= 20


async def test_observe_updates_stats_and_refits(client, server):
    before = server.runtime.estimator.fitted_at
    prompt = "Summarise the plot of Hamlet in three sentences"
    [est] = await client.predict([prompt], timeout_s=10)
    await client.observe("", 60, prediction_id=est.prediction_id, timeout_s=10)  # no prompt: the id says it
    for i in range(1, 5):
        await client.observe(f"{prompt} v{i}", 60, timeout_s=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = predictor_pb2_grpc.PredictorServiceStub(ch)
        for _ in range(100):
            stats = await stub.GetStats(predictor_pb2.GetStatsRequest(), timeout=5)
            if stats.head_fitted_at > before:
                break
            await asyncio.sleep(0.05)
    assert stats.num_observations == 5 and stats.num_entries == 30 + 5
    assert stats.mean_abs_error == pytest.approx(abs(est.p50 - 60), rel=1e-5)
    assert stats.head_fitted_at > before and stats.encoder == "all-MiniLM-L6-v2-L5-qint8"
    assert stats.embedding_dim == 384 and stats.index_type == "flat" and list(stats.bucket_edges)
    [again] = await client.predict([prompt], timeout_s=10)
    assert again.source == "knn" and again.p50 == pytest.approx(60, rel=0.1)


@pytest.mark.parametrize("prompts,message", [
    ([], "prompts must not be empty"),
    (["fine", ""], r"prompts\[1\] is empty"),
    (["x"] * 301, "too many prompts: 301 > max_prompts_per_request 300"),
])
async def test_bad_requests_are_invalid_argument(client, server, prompts, message):
    with pytest.raises(PredictorUnavailable, match=message) as info:
        await client.predict(prompts, timeout_s=10)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_healthy(server.port)


async def test_non_utf8_bytes_get_a_clear_status(server, client):
    raw = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompts), 3 bytes that are not UTF-8
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_unary("/alise.v1.PredictorService/Predict")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(raw, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in info.value.details()
        observe = ch.stream_stream("/alise.v1.PredictorService/Observe")
        good = predictor_pb2.Observation(prompt="hello there", output_tokens=3, sequence=2).SerializeToString()
        replies = [predictor_pb2.ObserveResponse.FromString(r) async for r in observe(iter([raw, good]),
                                                                                       timeout=10)]
        assert (replies[-1].num_accepted, replies[-1].num_rejected) == (1, 1)
        assert replies[-1].durable_sequence == 2
    await assert_healthy(server.port)
    assert len(await client.predict(["still works?"], timeout_s=10)) == 1


async def test_one_megabyte_prompt_is_truncated_and_reported(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = predictor_pb2_grpc.PredictorServiceStub(ch)
        reply = await stub.Predict(predictor_pb2.PredictRequest(
            prompts=["short one", "word " * 200_000]), timeout=10)
    assert list(reply.truncated) == [1] and len(reply.predictions) == 2
    await assert_healthy(server.port)


async def test_restart_restores_history_and_corruption_fails_start(encoder, server, tmp_path):
    await server.runtime.observe([ObservationIn(42, prompt="a brand new prompt")])
    await server.stop(0.5)  # drains and snapshots
    config = PredictorConfig(address="127.0.0.1:0", index_dir=str(tmp_path / "index"), model="m1")
    again = await start_predictor_server(config, encoder=encoder)
    try:
        assert again.runtime.history.num_prompts == 31
        assert again.runtime.history.row_of("a brand new prompt") is not None
    finally:
        await again.stop(0.5)
    [snap] = (tmp_path / "index").glob("snap-*")
    (snap / "prompts.json").write_text("[]")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        await start_predictor_server(config, encoder=encoder)


# -- the encoder -------------------------------------------------------------------------------

ENCODER_PROMPTS = ["hi", "Write a one-word answer: what color is grass",
                   "Explain how a transformer works. " * 40,  # past 256 tokens: truncated
                   "word " * 200_000, "Summarise the plot of Hamlet in three sentences", "ok?"]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own encode of the same model: the ground truth."""
    from sentence_transformers import SentenceTransformer

    from alise.predictor.tokens import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu", local_files_only=True)

    def encode(prompts, max_chars):
        return model.encode([p[:max_chars] for p in prompts], normalize_embeddings=True, convert_to_numpy=True)

    return model, encode


def test_fp32_at_the_models_depth_matches_sentence_transformers(reference):
    model, encode = reference
    fp32 = Encoder(int8=False, layers=6)
    assert fp32.name == "all-MiniLM-L6-v2" and fp32.layers == fp32.depth == 6
    got = fp32.encode(ENCODER_PROMPTS)
    assert (got.vectors * encode(ENCODER_PROMPTS, fp32.max_chars)).sum(axis=1).min() > 0.9999
    assert got.truncated == [False, False, True, True, False, False]
    cut = [p[:fp32.max_chars] for p in ENCODER_PROMPTS]
    assert got.num_tokens == [len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in cut]


def test_default_vectors_are_the_mean_of_the_second_to_last_layer(reference):
    import torch

    model, _ = reference
    fp32 = Encoder(int8=False)
    assert fp32.name == "all-MiniLM-L6-v2-L5" and (fp32.layers, fp32.depth) == (5, 6)
    prompts = [p[:fp32.max_chars] for p in ENCODER_PROMPTS]
    got = fp32.encode(prompts).vectors
    bert = model[0].auto_model  # transformers' own forward, every layer's states
    with torch.inference_mode():
        for prompt, vector in zip(prompts, got, strict=True):
            batch = model.tokenizer([prompt], truncation=True, max_length=256, return_tensors="pt")
            states = bert(**batch, output_hidden_states=True).hidden_states
            assert len(states) == 7  # the embeddings, then six layers
            want = torch.nn.functional.normalize(states[5][0].mean(0), dim=0).numpy()
            assert float(vector @ want) > 0.9999
            assert float(vector @ torch.nn.functional.normalize(states[6][0].mean(0), dim=0).numpy()) < 0.99
    for bad in (0, 7):
        with pytest.raises(ValueError, match="layers must be in 1..6"):
            Encoder(layers=bad)


def test_int8_stays_close_to_fp32_and_has_its_own_name(encoder):
    assert encoder.name == "all-MiniLM-L6-v2-L5-qint8"
    prompts = ENCODER_PROMPTS + [f"{t} {i}" for i, (t, _) in enumerate(TOPICS * 5)] + [
        "Translate 'good morning' into French", "List five prime numbers", "Why is the sky blue?"]
    got = encoder.encode(prompts)
    cosine = (got.vectors * Encoder(int8=False).encode(prompts).vectors).sum(axis=1)
    # AlpacaEval (256 prompts): worst 0.991, mean 0.997 (bench/predictor_bench.py).
    assert cosine.min() > 0.95 and cosine.mean() > 0.98
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)


def test_vectors_do_not_depend_on_batch_or_shards(encoder):
    prompts = [f"{ENCODER_PROMPTS[i % 6][:300]} {i}" for i in range(60)]
    assert encoder.num_threads == 2 and sum(encoder.encode(prompts).num_tokens) > MIN_SHARD_TOKENS
    sharded = encoder.encode(prompts).vectors
    singles = np.concatenate([encoder.encode([p]).vectors for p in prompts[:12]])
    assert np.array_equal(sharded[:12], singles)  # each prompt runs alone: batch-mates change nothing
    assert np.array_equal(encoder.encode(prompts).vectors, sharded)  # nor does thread timing


def test_the_export_is_cached_and_an_unreadable_one_is_made_again(tmp_path, monkeypatch, encoder):
    monkeypatch.setenv("ALISE_CACHE_DIR", str(tmp_path))
    first = Encoder()
    assert first.graph_path.parent == tmp_path / "encoders" and first.graph_path.is_file()
    made = first.graph_path.stat().st_mtime_ns
    assert Encoder().graph_path == first.graph_path and first.graph_path.stat().st_mtime_ns == made
    first.graph_path.write_bytes(b"not a graph")
    again = Encoder()
    assert again.graph_path == first.graph_path and again.graph_path.stat().st_size > 1_000_000
    assert np.array_equal(again.encode(ENCODER_PROMPTS).vectors, encoder.encode(ENCODER_PROMPTS).vectors)
    assert Encoder(int8=False).graph_path != first.graph_path  # fp32 is its own graph


async def test_a_snapshot_of_another_encoder_is_embedded_again_and_loses_nothing(
        encoder, bootstrap_file, tmp_path):
    config = PredictorConfig(address="127.0.0.1:0", index_dir=str(tmp_path / "index"), model="m1",
                             bootstrap=(bootstrap_file,))
    fp32 = Encoder(int8=False)
    first = await start_predictor_server(config, encoder=fp32)  # bootstraps and snapshots
    await first.runtime.observe([ObservationIn(42, prompt="a brand new prompt", model="m2")])
    first.runtime._dirty = False  # stopped as if killed: the new observation is only in the log
    await first.stop(0.5)
    old = first.runtime.history
    again = await start_predictor_server(config, encoder=encoder)  # int8: another encoder
    try:
        history = again.runtime.history
        assert (history.num_prompts, history.num_observations) == (old.num_prompts, old.num_observations) == (31, 61)
        assert history.texts == old.texts and history.keys == old.keys
        assert np.array_equal(history.prompt_tokens, old.prompt_tokens)
        assert history.row_of("a brand new prompt") is not None
        assert np.array_equal(np.asarray(history.index.vectors[:]), encoder.encode(history.texts).vectors)
        assert len(await PredictorClient(f"127.0.0.1:{again.port}").predict(["still works?"], timeout_s=10)) == 1
    finally:
        await again.stop(0.5)
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "index").glob("snap-*")]
    assert [m["encoder"] for m in manifests] == [encoder.name]  # the old snapshot is replaced
    third = await start_predictor_server(config, encoder=encoder)  # now a plain load
    assert third.runtime.history.num_observations == 61
    await third.stop(0.5)


def test_shorter_window_truncates_and_reports_it(reference):
    model, _ = reference
    enc = Encoder(max_seq_length=16, int8=False, layers=6)
    prompts = ["one two three", "word " * 14, "word " * 15]  # 14 tokens fit beside [CLS] [SEP]
    got = enc.encode(prompts)
    assert got.truncated == [False, False, True] and got.num_tokens == [3, 14, 15]
    model.max_seq_length = 16
    try:
        want = model.encode(prompts, normalize_embeddings=True, convert_to_numpy=True)
    finally:
        model.max_seq_length = 256
    assert (got.vectors * want).sum(axis=1).min() > 0.9999
    with pytest.raises(ValueError, match="max_seq_length"):
        Encoder(max_seq_length=4096)


async def test_observe_reuses_predicted_and_stored_embeddings(client, server, monkeypatch):
    runtime = server.runtime
    encoded_for_observe: list[list[str]] = []
    real = runtime.encoder.encode_async

    async def spy(prompts):
        encoded_for_observe.append(list(prompts))
        return await real(prompts)

    predicted = "Describe the water cycle to a ten-year-old"
    [est] = await client.predict([predicted], timeout_s=10)
    monkeypatch.setattr(runtime.encoder, "encode_async", spy)
    stored = runtime.history.texts[0]  # from the bootstrap
    await runtime.observe([ObservationIn(50, prediction_id=est.prediction_id),
                           ObservationIn(60, prompt=stored),
                           ObservationIn(70, prompt="A prompt nobody predicted")])
    assert encoded_for_observe == [["A prompt nobody predicted"]]
    row = runtime.history.row_of(predicted)
    want = runtime.encoder.encode([predicted])
    np.testing.assert_allclose(runtime.history.index.vectors[row], want.vectors[0], atol=1e-6)
    assert runtime.history.prompt_tokens[row] == want.num_tokens[0]
