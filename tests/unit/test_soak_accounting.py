"""bench/soak.py's bound on the observations a killed scheduler takes with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_script", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requests_finishing_between_the_read_and_the_kill_are_at_risk(soak):
    # The metrics read at t=100 shows 1 unacknowledged (the disk is full: none is taken);
    # the read takes a second, and three requests finish before the kill at t=101.4: their
    # observations die with the scheduler too.
    read_at, killed_at = 100.0, 101.4
    finished_at = [95.0, 99.9, 100.3, 100.9, 101.3]
    assert soak.observations_at_risk(1, finished_at, read_at, killed_at) == 4


def test_the_grace_after_the_kill_counts_and_the_next_scheduler_does_not(soak):
    read_at, killed_at = 100.0, 100.2
    # Last tokens sent before the kill, read by the client just after it; then a request
    # the restarted scheduler finished (it observes it itself).
    finished_at = [100.2 + soak.KILL_GRACE_S / 2, 100.2 + soak.KILL_GRACE_S + 3.0]
    assert soak.observations_at_risk(6, finished_at, read_at, killed_at) == 7
    assert soak.observations_at_risk(0, [], read_at, killed_at) == 0
