"""Predictor core without the encoder: index, snapshots, loaders, estimator behaviour."""

import gzip
import json

import numpy as np
import pytest

from alise.predictor.config import PredictorConfig
from alise.predictor.datasets import detect_format, load_records
from alise.predictor.estimator import EstimatorConfig, LengthEstimator
from alise.predictor.fitting import refit
from alise.predictor.history import History
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import SnapshotError, load_snapshot, save_snapshot

DIM = 16


def unit(rng, n, dim=DIM):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_history(n=50, seed=0, **index_kwargs):
    rng = np.random.default_rng(seed)
    history = History(VectorIndex(DIM, **index_kwargs))
    rows = history.add_prompts([f"prompt {i}" for i in range(n)], unit(rng, n), list(range(1, n + 1)))
    history.add_observations(rows, ["a"] * n, list(range(10, 10 + n)))
    history.add_observations(rows[:5], ["b"] * 5, [7] * 5)
    return history


# -- index and snapshots ---------------------------------------------------------------

def test_snapshot_round_trip_restores_everything(tmp_path):
    history = make_history()
    save_snapshot(history, tmp_path, "enc")
    restored = load_snapshot(tmp_path, "enc", DIM).history
    assert restored.texts == history.texts
    assert restored.models == ["a", "b"]
    for got, want in zip(restored.observations(), history.observations(), strict=True):
        np.testing.assert_array_equal(got, want)
    query = history.index.vectors[:3]
    np.testing.assert_array_equal(restored.index.search(query, 4)[1], history.index.search(query, 4)[1])
    assert restored.row_of("prompt 7") == 7


def test_second_snapshot_replaces_first_and_keeps_one(tmp_path):
    history = make_history()
    save_snapshot(history, tmp_path, "enc")
    history.add_observations(np.array([0]), ["c"], [3])
    save_snapshot(history, tmp_path, "enc")
    assert len(list(tmp_path.glob("snap-*"))) == 1
    assert load_snapshot(tmp_path, "enc", DIM).history.num_observations == history.num_observations


def test_empty_or_missing_dir_means_no_index(tmp_path):
    assert load_snapshot(tmp_path / "nope", "enc", DIM) is None
    assert load_snapshot(tmp_path, "enc", DIM) is None


def test_corrupt_manifest_is_an_error(tmp_path):
    snap = save_snapshot(make_history(), tmp_path, "enc")
    (snap / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="manifest"):
        load_snapshot(tmp_path, "enc", DIM)


def test_corrupt_data_file_fails_checksum(tmp_path):
    snap = save_snapshot(make_history(), tmp_path, "enc")
    data = bytearray((snap / "vectors.npy").read_bytes())
    data[-1] ^= 0xFF
    (snap / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"vectors.npy: checksum mismatch"):
        load_snapshot(tmp_path, "enc", DIM)


@pytest.mark.parametrize("encoder,dim", [("other-encoder", DIM), ("enc", DIM * 2)])
def test_mismatched_encoder_or_dim_is_an_error(tmp_path, encoder, dim):
    save_snapshot(make_history(), tmp_path, "enc")
    with pytest.raises(SnapshotError, match="built with encoder 'enc'"):
        load_snapshot(tmp_path, encoder, dim)


def test_foreign_directory_is_not_silently_used(tmp_path):
    (tmp_path / "something.txt").write_text("hello")
    with pytest.raises(SnapshotError, match="not a predictor index"):
        load_snapshot(tmp_path, "enc", DIM)


def test_index_switches_to_ivf_past_threshold_and_survives_snapshot(tmp_path):
    rng = np.random.default_rng(1)
    history = History(VectorIndex(DIM, ivf_threshold=300, nprobe=64))
    vectors = unit(rng, 400)
    history.add_prompts([f"p{i}" for i in range(299)], vectors[:299], [1] * 299)
    assert history.index.index_type == "flat"
    history.add_prompts([f"p{i}" for i in range(299, 400)], vectors[299:], [1] * 101)
    assert history.index.index_type == "ivf" and len(history.index) == 400
    sims, rows = history.index.search(vectors[[5, 350]], 1)
    assert rows[:, 0].tolist() == [5, 350]
    save_snapshot(history, tmp_path, "enc")
    restored = load_snapshot(tmp_path, "enc", DIM, ivf_threshold=300).history
    assert restored.index.index_type == "ivf" and len(restored.index) == 400
    assert restored.index.search(vectors[[7]], 1)[1][0, 0] == 7


def test_duplicate_prompts_share_a_row():
    history = History(VectorIndex(DIM))
    rng = np.random.default_rng(2)
    rows = history.add_prompts(["x", "y", "x"], unit(rng, 3), [1, 1, 1])
    assert rows.tolist() == [0, 1, 0] and history.num_prompts == 2


# -- loaders ------------------------------------------------------------------------------

def _jsonl_gz(path, objs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")


def test_loaders_detect_and_parse_each_format(tmp_path):
    _jsonl_gz(tmp_path / "gpt4.jsonl.gz", [
        {"id": 3, "instruction": "Hi?", "output": "Hello", "generator": "gpt4", "dataset": "x"}])
    _jsonl_gz(tmp_path / "sg.jsonl.gz", [{"id": "abc", "prompt": "Explain"}])
    (tmp_path / "alpaca_data.json").write_text(json.dumps([
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Name a color", "input": "", "output": "red"}]))
    (tmp_path / "sharegpt.json").write_text(json.dumps([
        {"id": "c1", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Q1"},
                                       {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}]},
        {"id": "c2", "conversations": [{"from": "gpt", "value": "orphan"}]}]))
    assert detect_format(tmp_path / "gpt4.jsonl.gz") == "alpaca_eval"
    assert detect_format(tmp_path / "sg.jsonl.gz") == "sharegpt_prompts"
    assert detect_format(tmp_path / "alpaca_data.json") == "alpaca"
    assert detect_format(tmp_path / "sharegpt.json") == "sharegpt"
    [ae] = load_records(tmp_path / "gpt4.jsonl.gz")
    assert (ae.prompt_id, ae.prompt, ae.output, ae.model) == ("alpaca_eval:3", "Hi?", "Hello", "gpt4")
    [sg] = load_records(tmp_path / "sg.jsonl.gz")
    assert sg.output is None and sg.prompt == "Explain"
    alpaca = load_records(tmp_path / "alpaca_data.json")
    assert [r.prompt for r in alpaca] == ["Add\n\n1 and 2", "Name a color"]
    [conv] = load_records(tmp_path / "sharegpt.json")
    assert (conv.prompt, conv.output) == ("Q1", "A1")


def test_loader_rejects_unknown_content(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="unrecognised"):
        load_records(tmp_path / "x.jsonl")


# -- estimator ----------------------------------------------------------------------------

def synthetic(rng, n, centers):
    """Prompts around 8 topics; topic t answers ~ 20 * 2**(t % 6) tokens (noisy)."""
    topic = rng.integers(0, len(centers), n)
    v = centers[topic] + 0.35 * unit(rng, n) / np.sqrt(DIM)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    tokens = (20 * 2.0 ** (topic % 6) * np.exp(rng.normal(0, 0.3, n))).astype(int)
    texts = [f"topic{t} request number {i} {rng.integers(1e9)}" for i, t in enumerate(topic)]
    return v.astype(np.float32), texts, tokens


def fit_and_score(history, test, cfg=None):
    est = LengthEstimator(history, cfg or EstimatorConfig(min_model_observations=10))
    refit(est)
    v, texts, y = test
    out = est.predict(v, texts, np.full(len(texts), 10), "m")
    return est, out, float(np.abs(out.p50 - y).mean())


def test_predictions_improve_as_history_grows():
    rng = np.random.default_rng(0)
    centers = unit(rng, 8)
    test = synthetic(rng, 200, centers)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 20, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 20), ["m"] * 20, y)
    _, _, small_mae = fit_and_score(history, test)
    v, texts, y = synthetic(rng, 600, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 600), ["m"] * 600, y)
    _, _, large_mae = fit_and_score(history, test)
    assert large_mae < 0.7 * small_mae


def test_quantiles_are_ordered_and_calibrated():
    rng = np.random.default_rng(3)
    centers = unit(rng, 8)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 500, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 500), ["m"] * 500, y)
    test = synthetic(rng, 400, centers)
    _, out, _ = fit_and_score(history, test)
    assert np.all(out.p50 <= out.p90) and np.all(out.mean > 0)
    np.testing.assert_allclose(out.bucket_probs.sum(axis=1), 1.0, atol=1e-6)
    coverage = float((test[2] <= out.p90).mean())
    assert 0.8 <= coverage <= 0.97
    assert set(out.source) <= {"blend", "head", "knn"}


def test_unfitted_estimator_returns_prior_and_duplicates_use_their_answer():
    rng = np.random.default_rng(4)
    history = History(VectorIndex(DIM))
    est = LengthEstimator(history)
    out = est.predict(unit(rng, 2), ["a", "b"], np.array([1, 1]), "m")
    assert out.source == ["prior", "prior"]
    centers = unit(rng, 8)
    v, texts, y = synthetic(rng, 100, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 100), ["m"] * 100, y)
    est.sync()
    refit(est)
    out = est.predict(v[:1], texts[:1], np.array([10]), "m")
    assert out.source == ["knn"]
    assert out.p50[0] == pytest.approx(y[0], rel=0.15)


def test_configs_validate_fields():
    with pytest.raises(ValueError, match="num_neighbors"):
        EstimatorConfig(num_neighbors=0)
    with pytest.raises(ValueError, match="bucket_edges"):
        EstimatorConfig(bucket_edges=(64, 32))
    with pytest.raises(ValueError, match="address"):
        PredictorConfig(address="nope")
    with pytest.raises(ValueError, match="refit_interval_s"):
        PredictorConfig(refit_interval_s=0)
    with pytest.raises(ValueError, match="encoder_max_seq_length"):
        PredictorConfig(encoder_max_seq_length=2)


def test_exact_duplicates_are_matched_by_text_not_by_similarity():
    rng = np.random.default_rng(5)
    centers = unit(rng, 8)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 100, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 100), ["m"] * 100, y)
    est = LengthEstimator(history)
    refit(est)
    # The same vector under another text is a neighbour, not the same prompt ...
    assert est.predict(v[:1], ["a different text"], np.array([10]), "m").source != ["knn"]
    # ... and the same text with a vector that moved (another backend's rounding) still is.
    moved = v[:1] + 0.05 * unit(rng, 1)
    moved /= np.linalg.norm(moved)
    assert est.predict(moved.astype(np.float32), texts[:1], np.array([10]), "m").source == ["knn"]


def test_a_model_with_no_history_gets_the_known_models_spread_of_scales():
    rng = np.random.default_rng(6)
    centers = unit(rng, 8)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 400, centers)
    rows = history.add_prompts(texts, v, [10] * 400)
    for model, scale in (("short", 0.25), ("long", 4.0)):
        history.add_observations(rows, [model] * 400, (y * scale).astype(int) + 1)
    est = LengthEstimator(history, EstimatorConfig(min_model_observations=10))
    refit(est)
    test_v, test_texts, _ = synthetic(rng, 50, centers)
    known = est.predict(test_v, test_texts, np.full(50, 10), "long")
    new = est.predict(test_v, test_texts, np.full(50, 10), "a-new-model")
    # Scales 16x apart: a new model's p90 must allow for either, a known model's need not.
    assert np.median(new.p90 / new.p50) > 2 * np.median(known.p90 / known.p50)


# -- refits are validated before they are served ---------------------------------------------

async def test_a_refit_that_validates_worse_than_the_serving_fit_is_not_served():
    from alise.predictor.runtime import PredictorRuntime

    rng = np.random.default_rng(5)
    centers = unit(rng, 8)

    def add(history, n, *, corrupt):
        v, texts, y = synthetic(rng, n, centers)
        if corrupt:  # answers whose lengths run against their topics' (a broken model's)
            y = (12_800 / np.maximum(y, 1)).astype(int)
        history.add_observations(history.add_prompts(texts, v, [10] * n), ["m"] * n, y)

    config = PredictorConfig(estimator=EstimatorConfig(min_model_observations=10))
    bad, good = History(VectorIndex(DIM)), History(VectorIndex(DIM))
    for history in (bad, good):
        add(history, 300, corrupt=False)
    # No encoder: a refit reads the history only.
    for runtime, history, corrupt in ((PredictorRuntime(config, None, bad), bad, True),
                                      (PredictorRuntime(config, None, good), good, False)):
        assert await runtime.refit() and runtime.last_validation is None  # the first: nothing to judge
        first = runtime.estimator.fitted
        add(history, 300, corrupt=corrupt)  # then sound answers, the newest: held out
        add(history, 300, corrupt=False)
        served = await runtime.refit()
        verdict = runtime.last_validation
        assert verdict.num_held_out == 300
        if corrupt:
            assert not served and not verdict.accepted and runtime.estimator.fitted is first
            assert verdict.candidate_error > 1.05 * verdict.serving_error
        else:
            assert served and verdict.accepted and runtime.estimator.fitted is not first
            assert runtime.estimator.fitted.num_observations == 900


def test_too_few_new_observations_are_not_judged():
    from alise.predictor.fitting import MIN_VALIDATION_OBSERVATIONS, fit_estimator, holdout_start

    rng = np.random.default_rng(6)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 200, unit(rng, 8))
    history.add_observations(history.add_prompts(texts, v, [10] * 200), ["m"] * 200, y)
    serving = fit_estimator(history.prefix(200 - 2 * MIN_VALIDATION_OBSERVATIONS + 1), EstimatorConfig())
    assert holdout_start(history, serving) is None
    serving = fit_estimator(history.prefix(200 - 2 * MIN_VALIDATION_OBSERVATIONS), EstimatorConfig())
    assert holdout_start(history, serving) == 200 - MIN_VALIDATION_OBSERVATIONS


def test_a_difference_within_the_noise_of_the_held_out_sample_is_no_verdict():
    from alise.predictor.fitting import Validation

    assert Validation(100, 0.100, 0.115, difference_se=0.01).accepted  # within two standard errors
    assert not Validation(100, 0.100, 0.125, difference_se=0.01).accepted
    assert Validation(100, 0.100, 0.1009, difference_se=0.0).accepted  # within the 1 % tolerance
    assert not Validation(100, 0.100, 0.102, difference_se=0.0).accepted


# -- conversation context ----------------------------------------------------------------------

def test_context_shift_is_the_earlier_answers_deviation_shrunk_by_their_number():
    import math

    from alise.predictor.context import MAX_PREVIOUS, context_shift

    offset = float(np.log1p(100))
    d = float(np.log1p(400)) - offset
    shift = context_shift([[], [400], [400, 400, 400], [400]], offset, prior_turns=2.0)
    np.testing.assert_allclose(shift, [0.0, d / 3, d * 3 / 5, d / 3])
    assert not context_shift([[400, 400]], offset, math.inf).any()
    # only the most recent answers count
    old = [0] * 10 + [400] * MAX_PREVIOUS
    assert context_shift([old], offset, 2.0)[0] == pytest.approx(d * MAX_PREVIOUS / (MAX_PREVIOUS + 2))


def test_prior_turns_are_fitted_by_moments_from_conversations_alone():
    import math

    from alise.predictor.context import fit_prior_turns

    rng = np.random.default_rng(11)
    tau, sigma = 0.6, 1.0  # conversation effect and per-answer spread, in log space
    convs = []
    for _ in range(3000):
        u = rng.normal(0, tau)
        convs.append(list(np.expm1(5.0 + u + rng.normal(0, sigma, rng.integers(1, 6))).astype(int)))
    assert fit_prior_turns(convs) == pytest.approx(sigma**2 / tau**2, rel=0.15)
    # few conversations: the covariance is shrunk, so the shift trusts them less
    assert fit_prior_turns(convs[:40]) > 1.5 * sigma**2 / tau**2
    alike = [list(np.expm1(5.0 + rng.normal(0, sigma, 4)).astype(int)) for _ in range(3000)]
    assert fit_prior_turns(alike) > 20 * sigma**2 / tau**2 or math.isinf(fit_prior_turns(alike))
    assert math.isinf(fit_prior_turns([[10], [300]])) and math.isinf(fit_prior_turns([]))


def fitted_estimator(prior_turns=2.0):
    rng = np.random.default_rng(12)
    centers = unit(rng, 8)
    history = History(VectorIndex(DIM))
    v, texts, y = synthetic(rng, 400, centers)
    history.add_observations(history.add_prompts(texts, v, [10] * 400), ["m"] * 400, y)
    est = LengthEstimator(history, EstimatorConfig(min_model_observations=10, context_prior_turns=prior_turns))
    refit(est)
    return est, synthetic(rng, 40, centers)


def test_earlier_answers_move_the_estimate_and_none_leave_it_as_it_was():
    est, (v, texts, _) = fitted_estimator()
    tokens = np.full(len(texts), 10)
    alone = est.predict(v, texts, tokens, "m")
    for empty in (None, [[]] * len(texts)):
        np.testing.assert_array_equal(est.predict(v, texts, tokens, "m", previous_output_tokens=empty).p50,
                                      alone.p50)
    wordy = est.predict(v, texts, tokens, "m", previous_output_tokens=[[2000, 1500]] * len(texts))
    terse = est.predict(v, texts, tokens, "m", previous_output_tokens=[[3]] * len(texts))
    assert np.all(wordy.p50 > alone.p50) and np.all(terse.p50 < alone.p50)
    assert np.all(wordy.p90 > wordy.p50) and wordy.source == alone.source


def test_estimates_never_go_below_zero_tokens():
    # Trusting the earlier answers fully (k tiny) and all of them empty takes short prompts'
    # log-length estimates under zero, where a residual quantile would give negative tokens.
    est, (v, texts, _) = fitted_estimator(prior_turns=1e-6)
    out = est.predict(v, texts, np.full(len(texts), 10), "m", previous_output_tokens=[[0] * 8] * len(texts))
    assert np.all(out.p50 >= 0) and np.all(out.mean >= 0) and np.all(out.p90 >= out.p50)
    assert (out.p50 == 0).any()


def test_a_served_model_learns_how_much_its_conversations_differ_from_their_answers():
    est, (v, texts, _) = fitted_estimator(prior_turns=None)
    tokens, n = np.full(len(texts), 10), len(texts)
    alone = est.predict(v, texts, tokens, "m").p50
    wordy = [[1500, 1200]] * n
    # nothing learned yet: earlier answers move nothing
    np.testing.assert_array_equal(est.predict(v, texts, tokens, "m", previous_output_tokens=wordy).p50, alone)
    rng = np.random.default_rng(13)
    for _ in range(300):  # conversations of one model, alike within, unlike between
        scale = rng.choice([5.0, 800.0])
        lengths = (scale * np.exp(rng.normal(0, 0.3, 4))).astype(int)
        for t in range(1, 4):
            est.observe_context("m", int(lengths[t]), lengths[:t].tolist())
    assert 0 < est.context_prior_turns("m") < 1.0 and est.context_prior_turns("other") == float("inf")
    assert np.all(est.predict(v, texts, tokens, "m", previous_output_tokens=wordy).p50 > 2 * alone)
    unlike = fitted_estimator(prior_turns=None)[0]
    for _ in range(300):  # answers of a conversation no more alike than any two
        lengths = (80 * np.exp(rng.normal(0, 1.0, 4))).astype(int)
        for t in range(1, 4):
            unlike.observe_context("m", int(lengths[t]), lengths[:t].tolist())
    assert unlike.context_prior_turns("m") > 20
