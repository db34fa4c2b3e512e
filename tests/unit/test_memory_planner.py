"""The adaptive KV planner: which action for which wait, prefetch, hysteresis, exact accounting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from alise.core.blocks import WorkerCapacity, held_device_blocks, held_host_blocks, place_blocks
from alise.core.commands import KvAction, Pause
from alise.core.config import SchedulingConfig
from alise.core.job import JobStatus, KvPlace
from alise.core.kv_places import PLACES, KvMoveRefused, actions_between, move_label
from alise.core.memory_planner import AdaptivePlanner, KvCostModel, drop_kept_tokens, make_memory_planner
from alise.core.policy import make_policy
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import virtual_worker
from alise.worker.engine import WorkerEngine
from corekit import LATENCY, make_job, step

BS = 4
BLOCK_BYTES = 1 << 20


def paused_job(job_id: str, cached: int, place=KvPlace.DEVICE):
    job = make_job(job_id, cached)          # prompt of `cached` tokens, none generated
    job.status, job.kv = JobStatus.PAUSED, place
    job.num_computed_tokens = cached
    return job


def planner(**kwargs) -> AdaptivePlanner:
    costs = KvCostModel(LATENCY, block_bytes=BLOCK_BYTES, swap_bytes_per_s=1e10,
                        quantize_bytes_per_s=1e11)
    return AdaptivePlanner(costs, headroom_fraction=0.0, **kwargs)


def capacity(num_device=64, num_host=64):
    return WorkerCapacity("w0", BS, num_device, num_host, 2048, 8, 4096, block_bytes=BLOCK_BYTES)


def test_transitions_are_the_worker_commands_in_order():
    assert actions_between(KvPlace.DEVICE, KvPlace.HOST_INT8) == (
        KvAction.QUANTIZE_INT8, KvAction.SWAP_TO_HOST)
    assert actions_between(KvPlace.HOST_INT4, KvPlace.DEVICE_INT4) == (KvAction.KEEP,)
    assert actions_between(KvPlace.DEVICE_INT8, KvPlace.NONE) == (KvAction.DROP,)


def test_the_planners_moves_are_exactly_those_the_worker_commands_make():
    """For every pair of places, the commands reach the target (``actions_between``) exactly
    when it is a downgrade of ``PLACES``, a prefetch back to the device, a drop (from
    anywhere) or no move at all; a downgrade frees device blocks; each place names its move."""
    for source, place in PLACES.items():
        for target, there in PLACES.items():
            prefetch = place.on_host and target is place.device
            expected = target in (source, KvPlace.NONE) or target in place.downgrades or prefetch
            try:
                actions_between(source, target)
                reached = True
            except KvMoveRefused:
                reached = False
            assert reached == expected, (source, target)
            if target in place.downgrades:
                left = place_blocks(target, 64, BS) if there.on_device else 0
                assert place.on_device and left < place_blocks(source, 64, BS)
        for counterpart in (place.device, place.host):
            assert counterpart is None or PLACES[counterpart].bits == place.bits
    assert len({p.label for p in PLACES.values()}) == len(PLACES)
    assert move_label(KvPlace.DEVICE, KvPlace.HOST_INT8) == "swap-int8"
    assert move_label(KvPlace.HOST_INT8, KvPlace.DEVICE_INT8) == "prefetch"
    assert move_label(KvPlace.HOST, KvPlace.NONE) == "drop"


def test_soon_job_is_quantized_long_waiter_is_swapped():
    # Two paused jobs of 64 cached tokens = 16 blocks each (16 MiB: 1.7 ms each way at
    # 10 GB/s; recomputing 64 tokens costs 6.5 ms). With 20 blocks left, one must go: "late"
    # (wait 10 s) swaps out for 2.7 ms (its swap-in is hidden), "soon" stays as it is.
    soon, late = paused_job("soon", 64), paused_job("late", 64)
    waits = {"soon": 0.0, "late": 10.0}
    moves = planner().plan([soon, late], waits, capacity(), 20, 64)
    assert {m.job.job_id: m.target for m in moves} == {"late": KvPlace.HOST}
    # With 10 blocks, "soon" must shrink by 6 more: int8 (9 blocks, 2.3 ms of error budget
    # and kernels) beats a swap whose swap-in would be exposed (4.4 ms) and a recompute.
    moves = planner().plan([soon, late], waits, capacity(), 10, 64)
    assert {m.job.job_id: m.target for m in moves} == {
        "soon": KvPlace.DEVICE_INT8, "late": KvPlace.HOST}
    # No host pool: the long waiter is dropped or compressed, never swapped.
    moves = planner().plan([soon, late], waits, capacity(num_host=0), 10, 0)
    assert KvPlace.HOST not in {m.target for m in moves}


def test_no_host_room_means_quantize_or_drop_never_overcommit():
    jobs = [paused_job(f"j{i}", 64) for i in range(4)]
    waits = {j.job_id: 1.0 + i for i, j in enumerate(jobs)}
    moves = planner().plan(jobs, waits, capacity(num_host=0), 12, 0)
    after = {m.job.job_id: m.target for m in moves}
    places = [after.get(j.job_id, j.kv) for j in jobs]
    assert KvPlace.HOST not in places
    assert sum(place_blocks(p, 64, BS) for p in places if p is not KvPlace.NONE) <= 12


def test_a_drop_is_priced_from_the_prefix_the_worker_still_caches_at_the_resume():
    # A paused job of 128 computed tokens (32 blocks), 30 blocks left: 2 must go. int8 frees 16
    # for 2.7 ms (error budget and kernels); a recompute of all 128 tokens costs 13 ms. A worker
    # caching prefixes keeps the dropped job's 32 full blocks, less the 2 handed out at once
    # (off its tail): while it hands out no others, the resume recomputes 8 tokens (1.0 ms) and
    # the drop is the cheaper. Handing out 100 blocks a second, a wait of 1 s leaves nothing.
    for reuse_blocks_per_s, wait_s, target in ((0.0, 0.0, KvPlace.NONE), (None, 0.0, KvPlace.DEVICE_INT8),
                                               (100.0, 1.0, KvPlace.DEVICE_INT8)):
        job = paused_job("j", 128)
        moves = planner().plan([job], {"j": wait_s}, capacity(num_host=0), 30, 0, reuse_blocks_per_s)
        assert [m.target for m in moves] == [target], (reuse_blocks_per_s, wait_s)
    job = paused_job("j", 128)
    assert drop_kept_tokens(job, KvPlace.DEVICE, BS, 2) == 128 - 2 * BS
    assert drop_kept_tokens(job, KvPlace.DEVICE_INT8, BS, 0) == 0  # only full-precision blocks are cached
    job.num_shared_tokens = 8 * BS  # read from the cache: it stays there whatever is handed out
    assert drop_kept_tokens(job, KvPlace.DEVICE, BS, 100) == 8 * BS


def test_prefetch_brings_back_a_job_about_to_run_and_not_one_that_waits():
    near = paused_job("near", 64, KvPlace.HOST)
    far = paused_job("far", 64, KvPlace.HOST)
    moves = planner().plan([near, far], {"near": 0.01, "far": 100.0}, capacity(), 40, 0)
    assert [(m.job.job_id, m.target, m.actions) for m in moves] == [
        ("near", KvPlace.DEVICE, (KvAction.KEEP,))]
    # Hysteresis: a job on the device with a long wait stays there while memory allows.
    kept = paused_job("kept", 64)
    assert planner().plan([kept], {"kept": 100.0}, capacity(), 40, 64) == []


def make_core(num_blocks, num_host, planner_name="adaptive", targets=None):
    core = SchedulerCore(make_policy(SchedulingConfig(policy="alise"), LATENCY),
                         make_memory_planner(planner_name, LATENCY, block_bytes=BLOCK_BYTES,
                                             swap_bytes_per_s=1e11))
    core.add_worker(WorkerCapacity("w0", BS, num_blocks, num_host, 200, 4, 4096,
                                   block_bytes=BLOCK_BYTES))
    worker = virtual_worker(num_device_blocks=num_blocks, block_size=BS, max_model_len=200,
                            latency=LATENCY, num_host_blocks=num_host, target_lengths=targets,
                            block_bytes=BLOCK_BYTES, swap_bytes_per_s=1e11)
    return core, worker


def check_accounting(core: SchedulerCore, worker: WorkerEngine, num_blocks: int, num_host: int):
    assert worker.allocator.num_used <= num_blocks
    host_used = num_host - worker.kv.num_free_host
    assert 0 <= host_used <= num_host
    view = core.workers["w0"]
    for job in view.jobs.values():
        seq = worker.seqs.get(job.job_id)
        if seq is None or job.status is not JobStatus.PAUSED:
            continue
        # The core counts exactly what the worker holds (no block ids, same numbers).
        assert held_device_blocks(job, BS) == len(seq.block_table), (job.job_id, job.kv, seq.place)
        assert held_host_blocks(job, BS) == len(seq.host_blocks), (job.job_id, job.kv)
    assert host_used == sum(held_host_blocks(j, BS) for j in view.jobs.values())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30), st.floats(1, 60)),
                min_size=1, max_size=12),
       st.integers(12, 40), st.integers(0, 30), st.data())
def test_core_and_virtual_worker_never_leak_or_overcommit(jobs, num_blocks, num_host, data):
    targets = {f"j{i}": out for i, (_, out, _) in enumerate(jobs)}
    core, worker = make_core(num_blocks, num_host, targets=targets)
    for i, (prompt, out, predicted) in enumerate(jobs):
        core.submit(make_job(f"j{i}", prompt, max_tokens=out + 5, predicted=predicted,
                             arrival_s=i * 0.01))
    for t in range(2000):
        if data.draw(st.integers(0, 15)) == 0 and core.jobs:
            core.cancel(data.draw(st.sampled_from(sorted(core.jobs))), t * 0.01)
        plan, _ = step(core, worker, now_s=t * 0.01)  # the worker raises on an overcommit
        assert not any(isinstance(c, Pause) and c.action is KvAction.SWAP_TO_HOST
                       for c in plan.commands) or num_host > 0
        check_accounting(core, worker, num_blocks, num_host)
        if not core.jobs:
            break
    step(core, worker, now_s=99.0)
    assert not core.jobs and not worker.seqs
    assert worker.kv.num_free_device == num_blocks and worker.kv.num_free_host == num_host
