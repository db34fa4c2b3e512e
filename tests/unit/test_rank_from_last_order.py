"""Ranking starts each sort from the worker's last ranked order (``StepPlanner._rank``): a job
whose key moves between two plans must still move in the ranking."""

from __future__ import annotations

import numpy as np

from alise.core.blocks import WorkerCapacity
from alise.core.commands import Admit, KvAction, Pause
from alise.core.job import JobStatus, LengthEstimate
from alise.core.planner import sort_by_key_and_label
from corekit import make_job, make_scheduler, step


def test_a_job_whose_estimate_falls_between_two_plans_overtakes_the_others() -> None:
    core, worker = make_scheduler("alise", num_blocks=64, max_num_seqs=1)
    for job_id, predicted in (("a", 500), ("b", 800), ("c", 900)):
        core.submit(make_job(job_id, 10, max_tokens=1000, predicted=predicted))
    plan, _ = step(core, worker)
    assert [c.job_id for c in plan.commands if isinstance(c, Admit)] == ["a"]
    plan, _ = step(core, worker, now_s=0.01)  # a ranking of the three to start the next one from
    assert not plan.commands
    core.update_estimate("c", LengthEstimate(1, 1, 2, "test"))  # last in that ranking, now first
    plan, _ = step(core, worker, now_s=0.02)
    assert [c for c in plan.commands if isinstance(c, Pause)] == [Pause("a", KvAction.KEEP)]
    assert [c.job_id for c in plan.commands if isinstance(c, Admit)] == ["c"]
    assert core.jobs["c"].status is JobStatus.RUNNING


def test_sort_by_key_and_label_is_the_stable_sort_of_the_rows_in_label_order() -> None:
    rng = np.random.default_rng(1)
    labels = rng.permutation(200) * 10
    for keys in (rng.random(50), rng.integers(0, 5, 50).astype(float), np.array([1.0, np.nan, 0.0, np.nan])):
        slots = rng.permutation(200)[:len(keys)]
        by_label = np.argsort(labels[slots], kind="stable")
        want = by_label[np.argsort(keys[by_label], kind="stable")]
        assert sort_by_key_and_label(keys, labels, slots).tolist() == want.tolist()


def test_a_lost_workers_last_ranking_is_dropped() -> None:
    core, worker = make_scheduler("alise", num_blocks=64, max_num_seqs=1)
    other = core.add_worker(WorkerCapacity("w1", 16, 64, 0, 2048, 1, 4096))
    for job_id in ("a", "b", "c"):
        core.submit(make_job(job_id, 10, max_tokens=1000, predicted=100))
    step(core, worker)
    core.schedule("w1", 0.0)
    assert set(core.planner._last_ranks) == {core.workers["w0"].index, other.index}
    core.remove_worker("w0", 0.01)
    core.schedule("w1", 0.01)
    assert set(core.planner._last_ranks) == {other.index}
