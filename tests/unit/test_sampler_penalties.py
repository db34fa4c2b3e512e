"""vLLM's logit adjustments in the sampler (logit bias, min_tokens, repetition, frequency and
presence penalties) against a plain per-token reference on random logits: each alone, mixed
batches whose other rows stay bit for bit, greedy and sampled rows, and an output token still
on the device (an overlapped step's) counted as if it were on the host."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from alise.core.job import Job
from alise.core.sampling import SamplingParams
from alise.worker.model.sampler import History, Sampler, adjust_logits

VOCAB = 64
EOS = 2


def upload(values, dtype):
    return torch.as_tensor(values, dtype=dtype)


def reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """vLLM's order, one token at a time: bias, the min_tokens mask, repetition, frequency, presence."""
    x = row.clone()
    for token, bias in p.logit_bias:
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in {*p.stop_token_ids, EOS}:
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return x


def random_history(rng: random.Random, num_prompt: int, num_output: int) -> tuple[list[int], list[int]]:
    # Few distinct ids, so tokens repeat within and across prompt and output.
    return [rng.randrange(12) for _ in range(num_prompt)], [rng.randrange(12) for _ in range(num_output)]


CASES = {
    "bias": SamplingParams(logit_bias={3: 5.0, 7: -100.0, 40: 0.5}),
    "min_tokens": SamplingParams(max_tokens=50, min_tokens=50, stop_token_ids=(5, 9)),
    "repetition": SamplingParams(repetition_penalty=1.7),
    "repetition_below_one": SamplingParams(repetition_penalty=0.6),
    "frequency": SamplingParams(frequency_penalty=0.8),
    "presence": SamplingParams(presence_penalty=-1.5),
    "all": SamplingParams(max_tokens=50, presence_penalty=0.4, frequency_penalty=-0.3, repetition_penalty=1.3,
                          min_tokens=50, stop_token_ids=(4,), logit_bias={4: 3.0, 11: -2.0}),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_each_adjustment_matches_the_reference_and_other_rows_are_untouched(name, temperature):
    rng = random.Random(name)
    torch.manual_seed(len(name))
    logits = torch.randn(6, VOCAB) * 3
    asking = replace(CASES[name], temperature=temperature)
    plain = SamplingParams(temperature=temperature)
    params = [plain, asking, plain, asking, asking, plain]
    histories = []
    for _ in params:
        prompt, output = random_history(rng, rng.randrange(1, 20), rng.randrange(0, 15))
        histories.append(History(prompt + output, len(output)))
    got = adjust_logits(logits, params, histories, upload, eos_token_id=EOS)
    for i, (p, h) in enumerate(zip(params, histories, strict=True)):
        if p is plain:
            assert torch.equal(got[i], logits[i])  # bit for bit
        else:
            want = reference(logits[i], p, list(h.prompt_ids), list(h.output_ids_on_host))
            assert not torch.equal(want, logits[i])  # the case changes this row
            torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-5)
    if temperature == 0.0:  # greedy rows take the argmax of the adjusted logits
        ids = Sampler(EOS).sample(logits, params, [None] * 6, histories)
        assert ids == got.argmax(dim=-1).tolist()


def test_rows_without_adjustments_get_the_logits_themselves():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(min_tokens=2)]
    histories = [None, None, History([1, 2, 3, 4], 2)]  # min_tokens reached: nothing to mask
    assert adjust_logits(logits, params, histories, upload, eos_token_id=EOS) is logits


def test_min_tokens_masks_until_reached_then_not():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = logits[0, 9] = 50.0  # EOS and the stop id are by far the most likely
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,))
    sampler = Sampler(EOS)
    for num_output, stops in [(0, False), (2, False), (3, True)]:
        token = sampler.sample(logits, [p], [None], [History([7] * 5 + [1] * num_output, num_output)])[0]
        assert (token in (EOS, 9)) is stops, (num_output, token)


def test_a_strong_bias_decides_a_sampled_row():
    torch.manual_seed(0)
    logits = torch.randn(200, VOCAB)
    ids = Sampler().sample(logits, [SamplingParams(temperature=1.0, logit_bias={13: 100})] * 200, [None] * 200)
    assert set(ids) == {13}


def test_an_output_token_still_on_the_device_counts_as_output():
    """An overlapped step's row whose last token the host has not read: row ``pending_row`` of
    the step before's ids. Same adjustments as with that token in the host history."""
    torch.manual_seed(3)
    logits = torch.randn(2, VOCAB)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.2,
                       min_tokens=3, stop_token_ids=(5,))
    prompt, output, last = [1, 2, 3], [8, 8], 21
    on_host = [History(prompt + output + [last], 3), History(prompt + [last], 1)]
    pending_ids = torch.tensor([0, last, 99])
    on_device = [History(prompt + output, 3, pending_row=1), History(prompt, 1, pending_row=1)]
    want = adjust_logits(logits, [p, p], on_host, upload, eos_token_id=EOS)
    got = adjust_logits(logits, [p, p], on_device, upload, eos_token_id=EOS, pending_ids=pending_ids)
    assert torch.equal(got, want)
    ignored = adjust_logits(logits, [p, p], [History(prompt + output, 2), History(prompt, 0)], upload,
                            eos_token_id=EOS)
    assert not torch.equal(ignored, want)  # the pending token does change them


def test_a_penalized_row_without_history_is_an_error():
    with pytest.raises(ValueError, match="no token history"):
        Sampler().sample(torch.randn(1, VOCAB), [SamplingParams(presence_penalty=1.0)], [None])


@pytest.mark.parametrize("kwargs, message", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(frequency_penalty=-2.01), "frequency_penalty must be in [-2, 2], got -2.01"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be finite and > 0, got 0.0"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0, got -1"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens must be at most max_tokens (4), got 5"),
    (dict(logit_bias={3: 101}), "logit_bias of token 3 must be a number in [-100, 100], got 101"),
    (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids (integers >= 0), got -1"),
    (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias has 301 entries; at most 300 are allowed"),
])
def test_bad_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_neutral_and_edge_values_are_accepted():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1, min_tokens=16,
                       max_tokens=16, logit_bias={9: -100, 3: 100})
    assert p.logit_bias == ((3, 100.0), (9, -100.0)) and p.has_penalties
    assert not SamplingParams(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1).has_penalties


def test_an_oracle_length_below_min_tokens_caps_both():
    # Trace replay ends a job at its recorded length: min_tokens cannot ask for more than that.
    job = Job("j", [1, 2, 3], SamplingParams(max_tokens=20, min_tokens=10), arrival_s=0.0, oracle_output_tokens=5)
    assert (job.worker_sampling.max_tokens, job.worker_sampling.min_tokens) == (5, 5)
    assert job.sampling.min_tokens == 10
