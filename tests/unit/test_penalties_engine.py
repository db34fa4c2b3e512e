"""Penalties and min_tokens through the worker's engine on a real tiny model on the CPU: a job
does not stop on a stop id before min_tokens, penalties change a greedy stream, and overlapped
steps (whose penalized rows count a token still on the device) give the synchronous tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_async_steps import make_engine, make_plans, outputs, prompt, run_overlapped, streams

from alise.core.commands import Admit, StepPlan
from alise.core.job import FinishReason
from alise.core.sampling import SamplingParams
from alise.worker.model.loader import load_model
from tinymodels import make_tiny_model_dir


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("penalty-llama"), "llama")
    return load_model(str(path), device="cpu")


def run_alone(loaded, sampling: SamplingParams, tokens: list[int]) -> tuple[list[int], FinishReason | None]:
    engine = make_engine(loaded, "eager")
    plans = [StepPlan(0, commands=[Admit("j", tokens, sampling)], chunks={"j": len(tokens)}, run_step=True)]
    out: list[int] = []
    reason = None
    for step_id in range(sampling.max_tokens):
        plan = plans[0] if step_id == 0 else StepPlan(step_id, run_step=True)
        for o in engine.run(plan).outputs:
            out += o.token_ids
            reason = o.finish_reason
        if reason is not None:
            break
    return out, reason


def test_a_stop_id_ends_a_job_only_after_min_tokens(loaded):
    tokens = prompt(10, 1)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free, _ = run_alone(loaded, greedy, tokens)
    stop = free[0]
    assert run_alone(loaded, replace(greedy, stop_token_ids=(stop,)), tokens) \
        == ([stop], FinishReason.STOP)
    held = replace(greedy, stop_token_ids=(stop,), min_tokens=4)
    out, reason = run_alone(loaded, held, tokens)
    assert stop not in out[:4] and len(out) > 4
    assert reason is FinishReason.LENGTH or out[-1] == stop and out.count(stop) == 1


def test_a_repetition_penalty_changes_a_repeating_greedy_stream(loaded):
    tokens = prompt(10, 2)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    free, _ = run_alone(loaded, greedy, tokens)
    assert len(set(free)) < len(free)  # random weights repeat themselves
    penalized, _ = run_alone(loaded, replace(greedy, repetition_penalty=5.0,
                                                       frequency_penalty=2.0), tokens)
    assert penalized != free and len(set(penalized)) > len(set(free))


def script(vocab_size: int):
    greedy = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    commands = {
        0: [Admit("rep", prompt(20, 1), SamplingParams(**greedy, repetition_penalty=1.8, frequency_penalty=0.6)),
            Admit("plain", prompt(13, 2), SamplingParams(**greedy))],
        1: [Admit("presence", prompt(30, 3), SamplingParams(max_tokens=40, temperature=0.9, seed=4, ignore_eos=True,
                                                            presence_penalty=1.5, logit_bias={17: 4.0}))],
        3: [Admit("min", prompt(9, 4), SamplingParams(**greedy, min_tokens=12, frequency_penalty=-0.5,
                                                      stop_token_ids=tuple(range(0, vocab_size, 2)),
                                                      logit_bias={2: 100.0}))],
    }
    return commands, {}


@pytest.mark.parametrize("mode", ["eager", "graph-buffers"])
def test_overlapped_steps_give_the_synchronous_penalized_tokens(loaded, mode):
    commands, aborts = script(loaded.config.vocab_size)
    plans, expected = make_plans(make_engine(loaded, "eager"), commands, aborts)
    got = run_overlapped(make_engine(loaded, mode), plans, aborts)
    assert outputs(got) == outputs(expected)
    final = streams(expected)
    assert len(final["rep"][0]) > 10 and len(final["presence"][0]) > 10
    # The even ids stop "min", and 2 is biased to win: held off for 12 tokens, then it stops.
    assert final["min"] == (final["min"][0], FinishReason.STOP) and len(final["min"][0]) == 13
    assert all(t % 2 for t in final["min"][0][:12]) and final["min"][0][12] == 2
