"""The core's plans for a fixed random workload are the recorded ones (``plan_trace.py``):
a change that is meant to make planning cheaper must leave every decision as it was. A change
that is meant to alter decisions rewrites the record (``python tests/unit/plan_trace.py``) and
says why in its commit."""

from __future__ import annotations

import json

import pytest
from plan_trace import GOLDEN, POLICIES, SCENARIOS, Driver

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_plans_match_the_record(scenario: str, policy: str) -> None:
    seed = list(SCENARIOS).index(scenario)
    got = Driver(policy, SCENARIOS[scenario], seed=seed).run()
    want = RECORDED[f"{scenario}/{policy}"]
    first = next((i for i, (a, b) in enumerate(zip(got["plans"], want["plans"], strict=False)) if a != b), None)
    assert first is None, f"plan {first} of {len(want['plans'])} differs from the record"
    assert got == want
