"""The core's plans for a fixed random workload are the recorded ones (``plan_trace.py``):
a change that is meant to make planning cheaper must leave every decision as it was.

A change that is meant to alter decisions rewrites the record with
``.venv/bin/python tests/unit/plan_trace.py`` (it records every scenario under every policy)
and says why in its commit. The record is only as good as the tree it was made from: rewrite
it from a tree whose plans are trusted (the change that alters decisions, checked on its own
terms), never to make a planning optimization pass, and check with ``git diff`` that the
scenarios the change should not touch kept their digests. A new scenario is added the same way:
its record is made by the current code, which it then holds to."""

from __future__ import annotations

import json

import numpy as np
import pytest
from plan_trace import GOLDEN, POLICIES, SCENARIOS, Driver

from alise.core.planner import stable_argsort

RECORDED = json.loads(GOLDEN.read_text())


def make_driver(scenario: str, policy: str) -> Driver:
    return Driver(policy, SCENARIOS[scenario], seed=list(SCENARIOS).index(scenario))


def assert_matches(got: dict, want: dict) -> None:
    first = next((i for i, (a, b) in enumerate(zip(got["plans"], want["plans"], strict=False)) if a != b), None)
    assert first is None, f"plan {first} of {len(want['plans'])} differs from the record"
    assert got == want


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_plans_match_the_record(scenario: str, policy: str) -> None:
    assert_matches(make_driver(scenario, policy).run(), RECORDED[f"{scenario}/{policy}"])


def test_the_drifting_scenario_ranks_by_a_moving_correction() -> None:
    """Under ``drift`` the correction takes a new value on nearly every step, over most of the
    drift's range, and alise orders idle jobs differently than it would at a correction of 1.0
    (its aging term is in plain seconds, so the correction's scale decides who overtakes whom):
    the record holds the correction-dependent decisions. The plans are the recorded ones, so
    looking does not change them."""
    driver = make_driver("drift", "alise")
    latency, keys = driver.latency, driver.core.policy.keys
    seen: set[float] = set()
    num_reordered = 0

    def keys_and_counterfactual(c, now_s: float) -> np.ndarray:
        nonlocal num_reordered
        live = keys(c, now_s)
        seen.add(latency.correction)
        held, latency.correction = latency.correction, 1.0
        try:
            plain = keys(c, now_s)
        finally:
            latency.correction = held
        idle = ~c.running
        num_reordered += not np.array_equal(stable_argsort(live[idle]), stable_argsort(plain[idle]))
        return live

    driver.core.policy.keys = keys_and_counterfactual
    assert_matches(driver.run(), RECORDED["drift/alise"])
    assert len(seen) > 300, f"the correction took only {len(seen)} values"
    assert min(seen) < 0.95 and max(seen) > 1.15, f"the correction stayed in [{min(seen)}, {max(seen)}]"
    assert num_reordered >= 100, f"the correction reordered idle jobs in only {num_reordered} plans"
