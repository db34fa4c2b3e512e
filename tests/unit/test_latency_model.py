"""LatencyModel: the step formula, fitting from a profile, online correction, the roofline."""

from __future__ import annotations

import pytest

from alise.core.latency_model import LatencyModel
from alise.tools.sim.profiles import opt13b_h100_roofline


def test_fit_recovers_the_coefficients_of_a_noise_free_profile():
    truth = LatencyModel(c0_s=0.02, c_seq_s=1e-3, c_ctx_s=2e-6, c_pre_s=3e-4, c_pre2_s=1e-8)
    samples = []
    for batch in (1, 2, 4, 8, 16):
        for ctx in (16, 128, 512):
            samples.append((batch, batch * ctx, [ctx] * batch,
                            truth.step_s(batch, batch * ctx, [ctx] * batch)))
            samples.append((batch, batch * (ctx + 1), [], truth.step_s(batch, batch * (ctx + 1))))
    fitted = LatencyModel.fit(samples)
    for name in ("c0_s", "c_seq_s", "c_ctx_s", "c_pre_s", "c_pre2_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3, abs=1e-12)


def test_online_correction_moves_toward_measured_steps():
    model = LatencyModel(c0_s=0.01)
    for _ in range(200):
        model.observe_step(2 * model.step_s(4, 100) / model.correction, 4, 100)
    assert model.correction == pytest.approx(2.0, rel=0.01)


def test_roofline_profile_of_opt13b_on_h100_and_round_trip():
    model = opt13b_h100_roofline()
    assert model.c0_s == pytest.approx(25.7e9 / 3e12)              # weights once per step
    assert model.c_ctx_s == pytest.approx(0.8e6 / 3e12)            # KV of each cached token
    assert model.meta["kind"] == "roofline"
    assert LatencyModel.from_json(model.to_json()) == model
    # a decode step of a full 15k-token KV cache: 8.57 ms of weights + 4 ms of KV
    assert model.step_s(60, 15_000) == pytest.approx(8.567e-3 + 4e-3, rel=1e-3)


def test_cycle_overhead_is_added_per_step_and_kept_out_of_the_correction():
    forward = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-4)
    served = LatencyModel.from_json(forward.to_json())
    served.c_cycle_s = 0.007
    assert served.step_s(8, 4000, [64]) == pytest.approx(forward.step_s(8, 4000, [64]) + 0.007)
    assert served.decode_token_s(500, 8) == pytest.approx(forward.decode_token_s(500, 8) + 0.007 / 8)
    # The worker reports forward time only: a perfect forward model keeps correction at 1.
    for _ in range(100):
        served.observe_step(forward.step_s(8, 4000), 8, 4000)
    assert served.correction == pytest.approx(1.0)
    assert LatencyModel.from_json(served.to_json()).c_cycle_s == 0.007
    with pytest.raises(ValueError, match="c_cycle_s"):
        LatencyModel.from_json('{"c_cycle_s": -1}')


def test_prefill_chunks_cost_a_fixed_and_a_per_chunk_term_which_the_fit_recovers():
    truth = LatencyModel(c0_s=0.011, c_seq_s=1e-5, c_ctx_s=3e-7, c_pre_s=2e-5, c_pre2_s=1e-8,
                         c_mixed_s=0.004, c_chunk_s=0.002, c_mixed_decode_s=0.006)
    assert truth.step_s(8, 4000) == pytest.approx(0.011 + 8e-5 + 4000 * 3e-7)  # decode only: no new terms
    alone = truth.step_s(1, 64, [64])
    assert alone == pytest.approx(0.011 + 1e-5 + 64 * 3e-7 + 0.004 + 0.002 + 64 * 2e-5 + 64 * 64 * 1e-8)
    with_one = truth.step_s(9, 4064, [64])
    with_four = truth.step_s(12, 4256, [64] * 4)
    assert with_one - truth.step_s(9, 4064) == pytest.approx(0.004 + 0.002 + 0.006 + 64 * 2e-5 + 64 * 64 * 1e-8)
    assert with_four - with_one == pytest.approx(3 * (0.002 + 64 * 2e-5 + 64 * 64 * 1e-8) + 3 * 1e-5 + 192 * 3e-7)
    samples = [(b, b * c, [], truth.step_s(b, b * c)) for b in (1, 8, 32, 64) for c in (128, 1024)]
    samples += [(1, n, [n], truth.step_s(1, n, [n])) for n in (16, 256, 1024, 2000)]
    for k, n, b in ((1, 48, 56), (2, 48, 56), (4, 48, 56), (1, 48, 8), (8, 32, 16), (3, 128, 32), (4, 64, 0)):
        seqs, ctx = k + b, k * n + b * 401
        samples.append((seqs, ctx, [n] * k, truth.step_s(seqs, ctx, [n] * k)))
    fitted = LatencyModel.fit(samples)
    for name in LatencyModel.FITTED:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3, abs=1e-12)
    # Profiles from before these terms load with them at 0 and price every step as before.
    old = LatencyModel.from_json('{"c0_s": 0.011, "c_pre_s": 2e-5}')
    assert old.c_mixed_s == old.c_chunk_s == 0.0
    assert old.step_s(3, 300, [100, 100]) == pytest.approx(0.011 + 1e-5 * 3 + 1e-8 * 300 + 2e-5 * 200)
    with pytest.raises(ValueError, match="c_chunk_s"):
        LatencyModel.from_json('{"c_chunk_s": -0.001}')


def test_absolute_fit_adds_up_to_the_measured_total():
    import random

    truth = LatencyModel(c0_s=0.012, c_seq_s=2e-5, c_ctx_s=3e-7, c_pre_s=1.5e-5, c_mixed_s=0.005, c_chunk_s=0.002)
    rng = random.Random(0)
    samples = []
    for _ in range(400):
        seqs = rng.randint(1, 60)
        chunks = [rng.randint(8, 300) for _ in range(rng.choice((0, 0, 0, 1, 2, 4)))]
        ctx = seqs * rng.randint(50, 400) + sum(chunks)
        samples.append((seqs + len(chunks), ctx, chunks, truth.step_s(seqs + len(chunks), ctx, chunks)
                        * rng.uniform(0.8, 1.3)))
    absolute = LatencyModel.fit(samples, relative=False)
    relative = LatencyModel.fit(samples)
    total = sum(s[3] for s in samples)
    assert sum(absolute.step_s(n, c, p) for n, c, p, _ in samples) == pytest.approx(total, rel=1e-6)
    # The relative fit weighs short steps up, so it need not add up to the total.
    assert abs(sum(relative.step_s(n, c, p) for n, c, p, _ in samples) - total) > 1e-6 * total


def test_a_chunk_is_allowed_what_keeps_the_step_within_the_ratio():
    m = LatencyModel(c0_s=8e-3, c_seq_s=1e-5, c_ctx_s=1e-8, c_pre_s=4e-5, c_mixed_s=2e-4, name="gpu")
    alone = m.forward_base_s(8, 4000)
    t = m.chunk_allowance(8, 4000, 1.5)
    assert m.forward_base_s(9, 4000 + t, [t]) <= 1.5 * alone < m.forward_base_s(9, 4001 + t, [t + 1])
    assert m.chunk_allowance(0, 0, 1.5) is None                   # no decodes to protect
    assert LatencyModel(c_pre_s=0.0, c_ctx_s=0.0).chunk_allowance(8, 4000, 1.5) is None
