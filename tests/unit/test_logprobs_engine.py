"""Logprobs through the worker's engine on a real tiny model on the CPU: each sampled token's
logprob and its row's top-k are the log-softmax of the runner's raw logits (before the
penalties, the bias, temperature and the filters), only for the rows that ask, greedy and
sampled; overlapped steps report the synchronous ones."""

from __future__ import annotations

import pytest
import torch
from test_async_steps import make_engine, make_plans, outputs, prompt, run_overlapped

from alise.core.commands import Admit, StepPlan, TokenLogprobs
from alise.core.sampling import SamplingParams
from alise.worker.model.loader import load_model
from alise.worker.model.sampler import Sampler
from tinymodels import make_tiny_model_dir


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("logprobs-llama"), "llama")
    return load_model(str(path), device="cpu")


def admits() -> list[Admit]:
    return [
        Admit("greedy", prompt(11, 1), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=5)),
        Admit("sampled", prompt(7, 2), SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=3,
                                                      ignore_eos=True, repetition_penalty=1.5,
                                                      logit_bias={7: 5.0}, logprobs=3)),
        Admit("zero", prompt(9, 3), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                   frequency_penalty=1.0, logprobs=0)),
        Admit("none", prompt(5, 4), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)),
    ]


def check(out, raw: torch.Tensor, k: int | None, tolerance: float = 1e-5) -> None:
    """``out`` (a JobOutput) against the raw logits of its row."""
    if k is None:
        assert out.logprobs is None
        return
    [lp] = out.logprobs
    assert isinstance(lp, TokenLogprobs)
    expected = torch.log_softmax(raw.double(), dim=-1)
    token = out.token_ids[0]
    assert lp.logprob == pytest.approx(expected[token].item(), abs=tolerance) and lp.logprob <= 0
    assert len(lp.top_ids) == len(lp.top_logprobs) == k
    assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
    if k:  # the k largest values, each its id's (whichever of tied ids comes first)
        assert list(lp.top_logprobs) == pytest.approx(expected.topk(k).values.tolist(), abs=tolerance)
        assert list(lp.top_logprobs) == pytest.approx(expected[list(lp.top_ids)].tolist(), abs=tolerance)
        assert len(set(lp.top_ids)) == k
    if token in lp.top_ids:
        assert lp.top_logprobs[lp.top_ids.index(token)] == lp.logprob


def test_logprobs_are_the_log_softmax_of_the_raw_logits(loaded):
    engine = make_engine(loaded, "eager")
    steps: list[torch.Tensor] = []
    execute = engine.executor.runner.execute

    def recording(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        steps.append(logits.clone())
        return logits

    engine.executor.runner.execute = recording
    commands = admits()
    wants = {a.job_id: a.sampling.logprobs for a in commands}
    reports = [engine.run(StepPlan(0, commands=commands, chunks={a.job_id: len(a.token_ids) for a in commands},
                                   run_step=True))]
    reports += [engine.run(StepPlan(i, run_step=True)) for i in range(1, 8)]
    num_checked = 0
    for report, logits in zip(reports, steps, strict=True):
        assert [o.job_id for o in report.outputs] == list(wants)  # one logits row per job, in order
        for out, raw in zip(report.outputs, logits, strict=True):
            check(out, raw, wants[out.job_id])
            num_checked += 1
    assert num_checked == 32
    greedy = [o for r in reports for o in r.outputs if o.job_id == "greedy"]
    assert all(o.logprobs[0].top_ids[0] == o.token_ids[0] for o in greedy)  # nothing adjusts its logits
    # The bias of 5 and the penalty make the sampled row pick tokens outside the raw top 3.
    sampled = [o for r in reports for o in r.outputs if o.job_id == "sampled"]
    assert any(o.token_ids[0] not in o.logprobs[0].top_ids for o in sampled)


def test_a_step_where_no_row_asks_computes_no_logprobs(loaded, monkeypatch):
    calls = []
    logprobs = Sampler.logprobs
    monkeypatch.setattr(Sampler, "logprobs", staticmethod(
        lambda *args, **kwargs: calls.append(logprobs(*args, **kwargs)) or calls[-1]))
    engine = make_engine(loaded, "eager")
    plain = Admit("plain", prompt(5, 4), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    report = engine.run(StepPlan(0, commands=[plain], chunks={"plain": 5}, run_step=True))
    assert report.outputs[0].logprobs is None and calls == []  # one scan of the rows skipped it


def logprob_outputs(reports):
    return [[(o.job_id, None if o.logprobs is None else [(lp.top_ids, lp.logprob, lp.top_logprobs)
                                                          for lp in o.logprobs]) for o in r.outputs]
            for r in reports]


def assert_same_logprobs(expected, got, tolerance: float = 1e-5) -> None:
    want, have = logprob_outputs(expected), logprob_outputs(got)
    assert sum(1 for r in have for _, lps in r if lps) > 40
    for step_want, step_have in zip(want, have, strict=True):
        for (job, a), (job_b, b) in zip(step_want, step_have, strict=True):
            assert job == job_b and (a is None) == (b is None)
            for (ids_a, lp_a, top_a), (ids_b, lp_b, top_b) in zip(a or [], b or [], strict=True):
                assert lp_a == pytest.approx(lp_b, abs=tolerance) and top_a == pytest.approx(top_b, abs=tolerance)
                assert tolerance > 1e-5 or ids_a == ids_b  # a device's tied values may swap ids


@pytest.mark.parametrize("mode", ["eager", "graph-buffers"])
def test_overlapped_steps_give_the_synchronous_logprobs(loaded, mode):
    commands = {0: admits()[:2], 2: admits()[2:]}
    plans, expected = make_plans(make_engine(loaded, "eager"), commands, {})
    got = run_overlapped(make_engine(loaded, mode), plans, {})
    assert outputs(got) == outputs(expected)
    assert_same_logprobs(expected, got)


def test_a_vocabulary_smaller_than_k_lists_every_token():
    logits = torch.randn(2, 5)
    on_device = Sampler.logprobs(logits, [SamplingParams(logprobs=20), SamplingParams(logprobs=2)],
                                 torch.tensor([1, 2]))
    wide, narrow = on_device.unpack(on_device.packed)
    assert sorted(wide.top_ids) == [0, 1, 2, 3, 4] and len(narrow.top_ids) == 2
    assert wide.logprob == pytest.approx(torch.log_softmax(logits[0], dim=-1)[1].item(), abs=1e-6)
