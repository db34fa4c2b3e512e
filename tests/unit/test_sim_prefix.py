"""The simulator with prefix caching: a conversation's later turns start after the blocks the
turn before left cached, so only their uncached tokens are prefilled (and priced by the latency
model), and their first tokens come sooner."""

from __future__ import annotations

import statistics

from alise.core.latency_model import LatencyModel
from alise.tools.sim.simulator import SimConfig, prompt_token_ids, simulate
from alise.tools.sim.sweep import summarize
from alise.tools.trace import TraceRequest

#: Prefill-heavy: a token of prompt costs what a tenth of a decode step does.
LATENCY = LatencyModel(c0_s=0.01, c_seq_s=1e-4, c_ctx_s=1e-6, c_pre_s=1e-3, name="test")


def conversation_trace(num: int = 8, turns: int = 4) -> list[TraceRequest]:
    """``num`` conversations of ``turns`` turns: each turn's prompt is the one before, its
    answer (40 tokens) and a 30-token message."""
    out = []
    for c in range(num):
        prompt = 200
        for t in range(turns):
            out.append(TraceRequest(f"c{c}t{t}", "", prompt, 40, arrival_s=0.3 * c + 10.0 * t,
                                    conversation_id=f"c{c}", turn=t, think_time_s=0.5 if t else 0.0))
            prompt += 40 + 30
    return out


def test_later_turns_prefill_only_what_is_not_cached():
    trace = conversation_trace()
    on = simulate(trace, LATENCY, SimConfig(kv_tokens=20_000, enable_prefix_caching=True))
    off = simulate(trace, LATENCY, SimConfig(kv_tokens=20_000, enable_prefix_caching=False))
    admitted = sum(r.prompt_tokens for r in trace)
    assert on.prefill.num_admitted_tokens == off.prefill.num_admitted_tokens == admitted
    assert off.prefill.num_cached_tokens == 0 and off.prefill.num_computed_tokens == admitted
    # Each later turn finds its predecessor's prompt and answer cached, but the last
    # (partial) block and what the step that sampled the last token did not cache.
    assert on.prefill.num_cached_tokens > 0.6 * sum(r.prompt_tokens for r in trace if r.turn)
    assert on.prefill.num_computed_tokens == admitted - on.prefill.num_cached_tokens
    assert summarize(on, 1.0).p50_ttft_s < 0.8 * summarize(off, 1.0).p50_ttft_s

    def later_turns_ttft_s(result) -> float:
        return statistics.median(r.ttft_s for r in result.records if trace[int(r.job_id[1:])].turn)

    assert later_turns_ttft_s(on) < 0.8 * later_turns_ttft_s(off)


def test_simulated_prompts_share_a_prefix_only_within_a_conversation():
    a, b = prompt_token_ids(0, 50, None), prompt_token_ids(1, 50, None)
    assert a != b and a[:16] != b[:16]
    assert prompt_token_ids(0, 50, None) == a  # fixed per request
