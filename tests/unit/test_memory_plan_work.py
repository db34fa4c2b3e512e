"""The adaptive KV planner does only the work a plan needs: the paused jobs' device blocks are
summed once, a sub-step that cannot move a job is skipped, and the expected waits are computed
only when a sub-step weighs them. Its moves are those of every sub-step run in full."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_memory_planner import capacity, paused_job, planner

from alise.core.blocks import place_blocks
from alise.core.job import JobStatus, KvPlace
from alise.core.kv_places import PLACES, actions_between
from alise.core.memory_planner import _QUANTIZED, AdaptivePlanner, KvMove, _Slot
from alise.core.waits import ExpectedWaits
from corekit import make_job, make_scheduler


def full_plan(p: AdaptivePlanner, paused, waits, cap, device_budget, host_budget, reuse_blocks_per_s=None):
    """``AdaptivePlanner.plan`` with every sub-step run in full: each sums the paused jobs'
    device blocks again and visits every slot in its sort order."""
    bs = cap.block_size
    if not paused and device_budget >= 0:
        return []
    slots = [_Slot(job, job.kv, job.kv, waits.get(job.job_id, 0.0), job.status is JobStatus.RUNNING,
                   job.num_private_tokens) for job in paused]
    host_free = host_budget
    allowed = p.allowed if cap.can_quantize_kv else p.allowed - _QUANTIZED
    demand = sum(s.device_blocks(bs) for s in slots)
    while demand > device_budget:
        slot, target = p._cheapest_downgrade(slots, bs, host_free, demand - device_budget, allowed,
                                             reuse_blocks_per_s)
        demand -= slot.device_blocks(bs)
        host_free += slot.host_blocks(bs)
        slot.place = target
        demand += slot.device_blocks(bs)
        host_free -= slot.host_blocks(bs)
    target_blocks = device_budget - int(cap.num_device_blocks * p.headroom_fraction)
    demand = sum(s.device_blocks(bs) for s in slots)
    for slot in sorted(slots, key=lambda s: -s.wait_s):
        if demand <= target_blocks:
            break
        here = PLACES[slot.place]
        if not here.on_device or here.host not in p.allowed or slot.place is not slot.source:
            continue
        need = place_blocks(here.host, slot.num_private_tokens, bs)
        if need > host_free or slot.wait_s < p.hysteresis * p._horizon_s(slot, bs, here.host):
            continue
        demand -= slot.device_blocks(bs)
        slot.place = here.host
        host_free -= need
    free = device_budget - sum(s.device_blocks(bs) for s in slots)
    for slot in sorted(slots, key=lambda s: s.wait_s):
        if not PLACES[slot.place].on_host or slot.place is not slot.source:
            continue
        if slot.wait_s > p._horizon_s(slot, bs, slot.place):
            continue
        device = PLACES[slot.place].device
        need = place_blocks(device, slot.num_private_tokens, bs)
        if need <= free:
            slot.place = device
            free -= need
    return [KvMove(s.job, s.place, actions_between(s.source, s.place))
            for s in slots if s.place is not s.source or s.pausing]


class Unread(Mapping[str, float]):
    """Waits that must not be read."""

    def __getitem__(self, job_id: str) -> float:
        raise AssertionError(f"read the wait of {job_id}")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("read the waits")

    def __len__(self) -> int:
        return 0


job_specs = st.lists(st.tuples(st.integers(1, 80), st.sampled_from(sorted(PLACES, key=lambda p: p.value)),
                               st.booleans(), st.floats(0.0, 5.0)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(specs=job_specs, device_budget=st.integers(0, 200), host_budget=st.integers(0, 120),
       headroom=st.sampled_from([0.0, 0.1, 0.5]), reuse=st.sampled_from([None, 0.0, 50.0]))
def test_the_plan_is_that_of_every_sub_step_run_in_full(specs, device_budget, host_budget, headroom, reuse):
    def jobs():  # a new set for each planner: a plan leaves the jobs as they are, but to be sure
        made = []
        for i, (cached, place, pausing, _) in enumerate(specs):
            job = paused_job(f"j{i}", cached, KvPlace.DEVICE if pausing else place)
            if pausing:  # a running job the step leaves out: its KV is on the device
                job.status = JobStatus.RUNNING
            made.append(job)
        return made

    waits = {f"j{i}": wait_s for i, (*_, wait_s) in enumerate(specs)}
    cap = capacity()
    p = planner()
    p.headroom_fraction = headroom
    got = p.plan(jobs(), waits, cap, device_budget, host_budget, reuse)
    want = full_plan(p, jobs(), waits, cap, device_budget, host_budget, reuse)
    assert [(m.job.job_id, m.target, m.actions) for m in got] == [(m.job.job_id, m.target, m.actions) for m in want]


def test_a_plan_that_moves_no_job_reads_no_wait():
    # Two paused jobs of 64 tokens (16 blocks each) and one pausing now, 4 tokens (1 block):
    # 33 blocks fit 40 with the headroom (10% of 64: 6 blocks) to spare; nothing moves, and the
    # pausing job's KV is kept.
    paused = [paused_job("a", 64), paused_job("b", 64), make_job("c", 4)]
    paused[2].status, paused[2].kv, paused[2].num_computed_tokens = JobStatus.RUNNING, KvPlace.DEVICE, 4
    p = planner()
    p.headroom_fraction = 0.1
    moves = p.plan(paused, Unread(), capacity(), 40, 64)
    assert [(m.job.job_id, m.target, m.actions) for m in moves] == [("c", KvPlace.DEVICE, ())]
    # 33 blocks in 38 leave less than the headroom: the planner weighs who could go to the host.
    with pytest.raises(AssertionError, match="read the wait"):
        p.plan(paused, Unread(), capacity(), 38, 64)
    # A job on the host may be brought back: that weighs its wait too.
    with pytest.raises(AssertionError, match="read the wait"):
        p.plan([paused_job("h", 64, KvPlace.HOST)], Unread(), capacity(), 40, 64)


def test_expected_waits_are_the_remaining_times_ahead():
    """A paused job's expected wait is the sum of the remaining times (corrected) of the jobs
    ranked ahead of it, summed in rank order; none is computed before the first read."""
    core, _ = make_scheduler("alise", num_blocks=64)
    for i in range(6):
        core.submit(make_job(f"j{i}", 8 + 4 * i, arrival_s=0.1 * i))
    table = core.table
    order = table.tie_order[::-1].copy()
    positions = np.array([1, 4])
    job_ids = [table.job_ids[order[p]] for p in positions]
    waits = ExpectedWaits(table, order, positions, job_ids, 1.25)
    assert table.is_stale[order].all()  # nothing computed yet
    assert len(waits) == 2 and sorted(waits) == sorted(job_ids)
    for job_id, p in zip(job_ids, positions.tolist(), strict=True):
        want = 0.0
        for slot in order[:p].tolist():
            want += float(table.remaining_base_s[slot]) * 1.25
        assert waits[job_id] == want
    assert not table.is_stale[order].any()
