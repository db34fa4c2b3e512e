"""Sampler: greedy is argmax, filters keep what they promise, seeds reproduce regardless of batch.

Distribution tests draw N=4000 rows from a fixed distribution under a fixed global seed and allow
+-0.04 around the expected frequency: that is more than 5 standard deviations (sd <= 0.008), so
they fail on a real bias, not on luck.
"""

from __future__ import annotations

import math

import pytest
import torch

from alise.core.sampling import SamplingParams
from alise.worker.model.sampler import Sampler, make_generator

NUM_DRAWS = 4000
FREQ_TOLERANCE = 0.04

# Token probabilities, most likely first so the nucleus arithmetic below is easy to follow.
PROBS = [0.5, 0.3, 0.15, 0.05]


def fixed_logits() -> torch.Tensor:
    return torch.tensor([math.log(p) for p in PROBS])


def frequencies(params: SamplingParams, logits: torch.Tensor | None = None) -> torch.Tensor:
    row = fixed_logits() if logits is None else logits
    torch.manual_seed(1234)
    ids = Sampler().sample(row.expand(NUM_DRAWS, -1).contiguous(), [params] * NUM_DRAWS, [None] * NUM_DRAWS)
    return torch.bincount(torch.tensor(ids), minlength=row.numel()).float() / NUM_DRAWS


def assert_frequencies(observed: torch.Tensor, expected: list[float]) -> None:
    assert torch.allclose(observed, torch.tensor(expected), atol=FREQ_TOLERANCE), (observed, expected)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    ids = Sampler().sample(logits, [SamplingParams(temperature=0.0)] * 8, [None] * 8)
    assert ids == logits.argmax(dim=-1).tolist()


def test_top_k_one_is_argmax_at_any_temperature() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    ids = Sampler().sample(logits, [SamplingParams(temperature=5.0, top_k=1)] * 8, [None] * 8)
    assert ids == logits.argmax(dim=-1).tolist()


def test_tiny_temperature_tends_to_argmax() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1e-4)] * 64
    assert Sampler().sample(logits, params, [None] * 64) == logits.argmax(dim=-1).tolist()


def test_temperature_one_follows_softmax() -> None:
    assert_frequencies(frequencies(SamplingParams(temperature=1.0)), PROBS)


def test_temperature_two_flattens_the_distribution() -> None:
    expected = torch.softmax(fixed_logits() / 2.0, dim=-1).tolist()  # 0.37, 0.29, 0.20, 0.12
    assert_frequencies(frequencies(SamplingParams(temperature=2.0)), expected)


def test_top_p_keeps_the_nucleus() -> None:
    # Mass before token 2 is 0.8 >= 0.7, so the nucleus is {0, 1}, renormalized to 0.625 / 0.375.
    assert_frequencies(frequencies(SamplingParams(top_p=0.7)), [0.625, 0.375, 0.0, 0.0])
    # Mass before token 2 is 0.8 < 0.85 (kept); before token 3 it is 0.95 (dropped).
    assert_frequencies(frequencies(SamplingParams(top_p=0.85)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_top_k_keeps_the_k_most_likely_in_vocab_order() -> None:
    # Permuted so that sorted order differs from id order: ids 1 (p=0.5) and 3 (p=0.3) are the top 2.
    order = torch.tensor([2, 0, 3, 1])
    observed = frequencies(SamplingParams(top_k=2), fixed_logits()[order])
    assert_frequencies(observed, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8])


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely() -> None:
    # min_p 0.5 keeps p >= 0.25: tokens 0 (0.5) and 1 (0.3), renormalized to 0.625 / 0.375.
    assert_frequencies(frequencies(SamplingParams(min_p=0.5)), [0.625, 0.375, 0.0, 0.0])
    # min_p 0.25 keeps p >= 0.125: token 2 (0.15) too; token 3 (0.05) never.
    assert_frequencies(frequencies(SamplingParams(min_p=0.25)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    # After temperature 2 the probabilities are 0.37, 0.29, 0.20, 0.12: min_p 0.5 keeps three.
    flat = torch.softmax(fixed_logits() / 2.0, dim=-1)
    kept = flat[:3] / flat[:3].sum()
    assert_frequencies(frequencies(SamplingParams(temperature=2.0, min_p=0.5)), kept.tolist() + [0.0])


def test_min_p_one_is_argmax_and_min_p_is_per_row() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=3.0, min_p=1.0), SamplingParams(temperature=3.0)] * 4
    ids = Sampler().sample(logits, params, [None] * 8)
    assert ids[0::2] == logits[0::2].argmax(dim=-1).tolist()
    # The unfiltered rows draw from all 100 tokens at temperature 3: not all argmax by chance.
    torch.manual_seed(6)
    draws = [Sampler().sample(logits, params, [None] * 8)[1::2] for _ in range(5)]
    assert any(d != logits[1::2].argmax(dim=-1).tolist() for d in draws)


def test_min_p_outside_zero_one_is_refused() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_p must be in"):
            SamplingParams(min_p=bad)


def test_filtered_tokens_never_appear() -> None:
    observed = frequencies(SamplingParams(top_k=3, top_p=0.7))
    assert observed[2:].sum().item() == 0.0


def test_seeded_draws_are_reproducible_and_independent_of_batch_mates() -> None:
    vocab = 1000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(seed=7)

    def draw_alone() -> list[int]:
        generator = make_generator(7, "cpu")
        return [Sampler().sample(row[None], [seeded], [generator])[0] for _ in range(20)]

    def draw_in_company(position: int) -> list[int]:
        generator = make_generator(7, "cpu")
        mates = make_generator(99, "cpu")
        out = []
        for step in range(20):
            batch = torch.randn(4, vocab, generator=torch.Generator().manual_seed(step))
            batch[position] = row
            params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(top_k=5),
                      SamplingParams(), SamplingParams(temperature=0.0)]
            gens: list[torch.Generator | None] = [mates, None, mates, None]
            params[position], gens[position] = seeded, generator
            out.append(Sampler().sample(batch, params, gens)[position])
        return out

    alone = draw_alone()
    assert draw_alone() == alone
    assert draw_in_company(0) == alone
    assert draw_in_company(2) == alone
    other_seed = make_generator(8, "cpu")
    assert [Sampler().sample(row[None], [seeded], [other_seed])[0] for _ in range(20)] != alone


def test_greedy_rows_stay_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=3.0)] * 3
    ids = Sampler().sample(logits, params, [None] * 6)
    assert ids[0::2] == logits[0::2].argmax(dim=-1).tolist()
    assert all(0 <= i < 50 for i in ids)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        Sampler().sample(torch.zeros(2, 10), [SamplingParams()], [None, None])


def test_make_generator_accepts_the_full_seed_range() -> None:
    first = torch.rand(3, generator=make_generator(2**64 - 1, "cpu"))
    assert torch.equal(first, torch.rand(3, generator=make_generator(2**64 - 1, "cpu")))
