"""The job table's slots in tie order, kept through arrivals, finishes, slot reuse, growth and
relabelling, and the sort that ranking relies on them for."""

from __future__ import annotations

import random

import numpy as np

from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.planner import stable_argsort
from alise.core.policy import RemainingTimeEstimator
from alise.core.sampling import SamplingParams
from alise.core.table import WAITING, JobTable


def test_tie_order_is_the_slots_by_label_through_adds_discards_and_growth() -> None:
    rng = random.Random(3)
    table = JobTable(RemainingTimeEstimator(LatencyModel()), capacity=4)
    live: list[Job] = []
    for i in range(400):
        if live and rng.random() < 0.4:
            table.discard(live.pop(rng.randrange(len(live))))
        else:
            # Many arrivals at one instant between two others: labels are split until relabelled.
            arrival = rng.choice((0.0, 1.0, 1.0, 1.0, 2.0))
            job = Job(f"j{i:03d}", [1, 2], SamplingParams(), arrival_s=arrival)
            table.put(job, WAITING, LengthEstimate(4, 4, 8))
            live.append(job)
        want = sorted(table.slot_of[j.job_id] for j in live)
        want.sort(key=lambda slot: int(table.tie_label[slot]))
        assert table.tie_order.tolist() == want
        expected = sorted(live, key=lambda j: (j.arrival_s, j.job_id))
        assert [table.jobs[s].job_id for s in table.tie_order.tolist()] == [j.job_id for j in expected]
    assert table.ties.epoch > 0  # the run relabelled at least once
    assert len(table.jobs) > 4  # and grew


def test_stable_argsort_is_numpys_stable_sort_with_and_without_ties() -> None:
    rng = np.random.default_rng(0)
    few_ties = rng.random(300)
    few_ties[rng.integers(0, 300, 15)] = few_ties[rng.integers(0, 300, 15)]  # a few runs of equal keys
    for keys in (rng.random(300), rng.integers(0, 20, 300).astype(float), few_ties, np.sort(few_ties),
                 np.array([2.0, np.nan, 1.0, np.nan]), np.array([1.0, 1.0, np.nan]), np.zeros(0), np.ones(1),
                 np.array([0.0, 5.0, 1.0, 2.0, 3.0])):  # first, middle and last in order, the rest not
        assert stable_argsort(keys).tolist() == np.argsort(keys, kind="stable").tolist()
