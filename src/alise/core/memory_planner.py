"""Where each paused job's KV cache lives next step: keep, int8, int4, host, or nowhere.

Pure Python (no grpc, no torch). The scheduler core selects the jobs of a step first;
whatever device blocks they leave over is the budget of the paused jobs on that worker.
A planner maps every paused (or now pausing) job to a target ``KvPlace`` and the worker
commands that get it there; the core applies the result (``StepPlanner._plan_memory``).
A move covers a job's private blocks only (``Job.num_private_tokens``): a prefix it reads from
the worker's prefix cache stays on the device, shared and read-only (``alise.worker.kv_manager``).

The adaptive rule (``AdaptivePlanner``)
--------------------------------------
Each paused job ``j`` has an expected wait ``W_j``: the sum of the estimated remaining
execution times of the jobs ahead of it in the policy's order (the paper's rule). Each
place has a cost in seconds, for that job, relative to where its KV is now:

* keep on device                 0
* int8 / int4 on device          quantize + dequantize time + an error penalty per format
* host (optionally int8 / int4)  the swap-out ``T_out`` (blocks freed to make room are needed
                                 at once, and the worker frees them when the copy lands),
                                 the exposed part of the swap-in, ``max(0, T_in - W_j)`` (a
                                 prefetch started ``T_in`` ahead hides it), a small overhead
                                 for the PCIe traffic, plus the quantization cost
* nowhere (drop)                 recomputing prompt + generated tokens: the marginal cost of
                                 that prefill in a step (latency model), less the prefix the
                                 worker's cache still holds at the resume (``drop_kept_tokens``:
                                 the blocks it hands out meanwhile evict the drop's, tail first)

with ``T_in`` = bytes / measured copy bandwidth. Four named sub-steps, each a small loop:

1. ``_fit_device``  while the paused jobs hold more device blocks than the budget, apply
                    the cheapest downgrade that covers the deficit alone, else the cheapest
                    per block freed (ties: the longest wait first), within the host budget.
                    Jobs expected to wait longest go to host first (their swap-in is hidden); jobs
                    about to run are quantized instead; drop only when that is cheaper or nothing
                    else fits.
2. ``_make_headroom`` beyond that, swap out long waiters whose swap is fully hidden until
                    ``headroom_fraction`` of the device is free, so the next arrivals do
                    not wait on a swap-out they need the blocks of.
3. ``_prefetch``    bring host jobs whose wait is under ``prefetch_factor * T_in +
                    prefetch_lead_s`` back to the device (soonest first) into what is free,
                    so their resume never waits on a copy.

Hysteresis: a job only moves when memory forces it (1), when the move is free and its wait
is at least ``hysteresis`` times its prefetch horizon (2), or when it is about to run (3); a
quantized job is never upgraded while paused (it dequantizes on resume), so it cannot bounce.
The host budget of one plan never counts blocks that the same plan frees on the host, so
the worker, which applies pauses before resumes, is never asked for more than it has.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

from alise.core.blocks import WorkerCapacity, blocks_for, held_device_blocks, place_blocks
from alise.core.choices import PLANNER_NAMES
from alise.core.commands import KvAction
from alise.core.job import Job, JobStatus, KvPlace
from alise.core.kv_places import PLACES, actions_between
from alise.core.latency_model import LatencyModel
from alise.core.prefix_cache import reusable_tokens
from alise.core.prefix_mirror import known_tokens


@dataclass(frozen=True)
class KvMove:
    """A job's KV goes to ``target``; ``actions`` are the Pause commands that take it there."""

    job: Job
    target: KvPlace
    actions: tuple[KvAction, ...]


@dataclass
class KvCostModel:
    """Seconds each KV move costs. Bandwidths are measured (bench/kv_bench.py)."""

    latency: LatencyModel
    #: Bytes of one full-precision block; 0 = unknown (then ``default_block_bytes``).
    block_bytes: int = 0
    default_block_bytes: int = 8 << 20   # Llama-7B, 16 tokens, fp16
    swap_bytes_per_s: float = 20e9
    #: Quantize or dequantize throughput, bytes of full-precision KV per second.
    quantize_bytes_per_s: float = 200e9
    #: Error budget, as seconds one would pay to avoid the loss (int4 loses more than int8).
    int8_penalty_s: float = 0.002
    int4_penalty_s: float = 0.02
    #: PCIe traffic is not free even when hidden: a small charge per swap.
    swap_overhead_s: float = 0.001

    def bytes_of(self, num_blocks: int) -> int:
        return num_blocks * (self.block_bytes or self.default_block_bytes)

    def transfer_s(self, num_blocks: int) -> float:
        return self.bytes_of(num_blocks) / self.swap_bytes_per_s

    def place_cost_s(self, job: Job, source: KvPlace, target: KvPlace, wait_s: float,
                     block_size: int, num_kept_tokens: int = 0) -> float:
        """Cost of holding ``job`` at ``target`` until it resumes, given it is at ``source``;
        ``num_kept_tokens``: of a drop, the prefix the worker's cache keeps (not recomputed)."""
        if target is source:
            return 0.0
        if target is KvPlace.NONE:
            # The recompute rides in a step that runs anyway: its marginal cost only.
            n, kept = job.num_tokens, min(num_kept_tokens, job.num_tokens - 1)
            return self.latency.step_s(1, n, (n - kept,), (kept,)) - self.latency.step_s(1, 0)
        full = blocks_for(job.num_private_tokens, block_size)
        cost = 0.0
        bits = PLACES[target].bits
        if bits < PLACES[source].bits:
            cost += 2 * self.bytes_of(full) / self.quantize_bytes_per_s
            cost += self.int8_penalty_s if bits == 8 else self.int4_penalty_s
        if PLACES[target].on_host and not PLACES[source].on_host:
            moved = place_blocks(target, job.num_private_tokens, block_size)
            # Blocks freed to make room now are needed now: the swap-out is exposed (the
            # worker frees them when the copy lands); the swap-in is hidden by a prefetch
            # only as far as the wait exceeds it.
            cost += self.swap_overhead_s + self.transfer_s(moved)
            cost += max(0.0, self.transfer_s(moved) - wait_s)
        return cost


def drop_kept_tokens(job: Job, source: KvPlace, block_size: int, num_reused_blocks: int) -> int:
    """Tokens of ``job``'s prefix that a worker caching prefixes still holds when the job
    resumes, if it drops the job's KV from ``source`` and hands ``num_reused_blocks`` blocks
    out before the resume.

    The drop caches the full blocks of its computed known tokens (``reusable_tokens``) when the
    KV is at full precision on the device; a shared prefix stays cached in any case. The
    allocator hands out uncached free blocks (the drop's partial tail) before it evicts cached
    ones, least recently released first, and the drop releases its tail first: the blocks
    handed out come off the end of the prefix. Older cached blocks of other jobs, evicted
    before these, are not counted on: a drop happens when the device is full, and then there
    are none."""
    shared = job.num_shared_tokens // block_size
    if source is not KvPlace.DEVICE:
        return shared * block_size
    full = reusable_tokens(job.num_computed_tokens, known_tokens(job), False) // block_size
    held = blocks_for(job.num_private_tokens, block_size)
    uncached = held - (full - shared)
    evicted = max(0, min(num_reused_blocks, held) - uncached)
    return max(full - evicted, shared) * block_size


@dataclass
class _Slot:
    """One paused job during planning."""

    job: Job
    source: KvPlace
    place: KvPlace
    wait_s: float
    pausing: bool
    #: ``job.num_private_tokens`` (planning changes no job's tokens).
    num_private_tokens: int

    def device_blocks(self, block_size: int) -> int:
        if not PLACES[self.place].on_device:
            return 0
        return place_blocks(self.place, self.num_private_tokens, block_size)

    def host_blocks(self, block_size: int) -> int:
        if not PLACES[self.place].on_host:
            return 0
        return place_blocks(self.place, self.num_private_tokens, block_size)


class MemoryPlanner(abc.ABC):
    name = "base"
    #: Whether ``plan`` reads the expected waits (the core computes them only then).
    uses_waits = True

    @abc.abstractmethod
    def plan(self, paused: list[Job], waits: Mapping[str, float], capacity: WorkerCapacity,
             device_budget: int, host_budget: int, reuse_blocks_per_s: float | None = None) -> list[KvMove]:
        """Targets for ``paused`` (best-ranked first): device blocks held after the plan stay
        within ``device_budget`` and newly used host blocks within ``host_budget``. Returns a
        move for every job that is pausing now or whose place changes. ``reuse_blocks_per_s``:
        how fast the worker hands freed blocks out again, evicting the prefixes that drops
        leave cached (None: the worker caches none)."""


class DropPlanner(MemoryPlanner):
    """The baseline: keep a paused job's KV while it fits (best-ranked first), else drop it."""

    name = "drop"
    uses_waits = False

    def plan(self, paused, waits, capacity, device_budget, host_budget, reuse_blocks_per_s=None):
        moves = []
        for job in paused:
            held = place_blocks(job.kv, job.num_private_tokens, capacity.block_size) \
                if PLACES[job.kv].on_device else 0
            target = job.kv if held <= device_budget else KvPlace.NONE
            device_budget -= held if target is job.kv else 0
            if target is not job.kv or job.status is JobStatus.RUNNING:
                moves.append(KvMove(job, target, actions_between(job.kv, target)))
        return moves


#: Places of quantized KV: a worker whose pages cannot be quantized (fp8) is planned without them.
_QUANTIZED = frozenset(place for place, p in PLACES.items() if p.bits < 16)


class AdaptivePlanner(MemoryPlanner):
    name = "adaptive"

    def __init__(self, costs: KvCostModel, *, allowed: frozenset[KvPlace] | None = None,
                 headroom_fraction: float = 0.1, prefetch_factor: float = 2.0,
                 prefetch_lead_s: float = 0.05, hysteresis: float = 2.0) -> None:
        self.costs = costs
        self.allowed = allowed if allowed is not None else frozenset(KvPlace)
        self.headroom_fraction = headroom_fraction
        self.prefetch_factor = prefetch_factor
        self.prefetch_lead_s = prefetch_lead_s
        self.hysteresis = hysteresis

    def plan(self, paused, waits, capacity, device_budget, host_budget, reuse_blocks_per_s=None):
        bs = capacity.block_size
        if capacity.block_bytes and not self.costs.block_bytes:
            self.costs.block_bytes = capacity.block_bytes
        if not paused and device_budget >= 0:
            return []  # what the sub-steps below return for no slots
        headroom = int(capacity.num_device_blocks * self.headroom_fraction)
        # NOTE: where the paused jobs fit with the headroom to spare and none is on the host, no
        # sub-step moves one (most plans): the jobs pausing now stay where they are.
        demand = sum(held_device_blocks(job, bs) for job in paused)
        if demand <= min(device_budget, device_budget - headroom) and not any(
                PLACES[job.kv].on_host for job in paused):
            return [KvMove(job, job.kv, actions_between(job.kv, job.kv)) for job in paused
                    if job.status is JobStatus.RUNNING]
        slots = [_Slot(job, job.kv, job.kv, waits.get(job.job_id, 0.0), job.status is JobStatus.RUNNING,
                       job.num_private_tokens) for job in paused]
        allowed = self.allowed if capacity.can_quantize_kv else self.allowed - _QUANTIZED
        # NOTE: ``demand`` is the paused jobs' device blocks (as above), kept by every sub-step as
        # it moves one.
        demand, host_free = self._fit_device(slots, bs, device_budget, demand, host_budget, allowed,
                                             reuse_blocks_per_s)
        demand, host_free = self._make_headroom(slots, bs, device_budget - headroom, demand, host_free)
        self._prefetch(slots, bs, device_budget - demand)
        return [KvMove(s.job, s.place, actions_between(s.source, s.place))
                for s in slots if s.place is not s.source or s.pausing]

    # ----------------------------------------------------------------- sub-steps

    def _fit_device(self, slots: list[_Slot], bs: int, budget: int, demand: int, host_free: int,
                    allowed: frozenset[KvPlace], reuse_blocks_per_s: float | None) -> tuple[int, int]:
        """(device demand, host blocks free) once the paused jobs fit ``budget``."""
        while demand > budget:
            best = self._cheapest_downgrade(slots, bs, host_free, demand - budget, allowed, reuse_blocks_per_s)
            if best is None:
                raise AssertionError("dropping frees every device block; unreachable")
            slot, target = best
            demand -= slot.device_blocks(bs)
            host_free += slot.host_blocks(bs)
            slot.place = target
            demand += slot.device_blocks(bs)
            host_free -= slot.host_blocks(bs)
        return demand, host_free

    def _make_headroom(self, slots: list[_Slot], bs: int, target_blocks: int, demand: int,
                       host_free: int) -> tuple[int, int]:
        """(device demand, host blocks free) once long waiters are swapped out down to ``target_blocks``."""
        if demand <= target_blocks:  # (most plans: nothing to swap, no sort)
            return demand, host_free
        for slot in sorted(slots, key=lambda s: -s.wait_s):
            if demand <= target_blocks:
                break
            here = PLACES[slot.place]
            host = here.host
            if not here.on_device or host not in self.allowed or slot.place is not slot.source:
                continue
            need = place_blocks(host, slot.num_private_tokens, bs)
            if need > host_free or slot.wait_s < self.hysteresis * self._horizon_s(slot, bs, host):
                continue
            demand -= slot.device_blocks(bs)
            slot.place = host
            host_free -= need
        return demand, host_free

    def _prefetch(self, slots: list[_Slot], bs: int, free: int) -> None:
        """Brings host jobs about to run back into the ``free`` device blocks, soonest first."""
        # Only a job still on the host where it was may move, and a move changes its own slot
        # alone: the stable sort of these is the order the whole list's sort visits them in.
        on_host = [s for s in slots if s.place is s.source and PLACES[s.place].on_host]
        for slot in sorted(on_host, key=lambda s: s.wait_s):
            if slot.wait_s > self._horizon_s(slot, bs, slot.place):
                continue
            device = PLACES[slot.place].device
            assert device is not None  # every host place has its device twin
            need = place_blocks(device, slot.num_private_tokens, bs)
            if need <= free:
                slot.place = device
                free -= need

    # ----------------------------------------------------------------- helpers

    def _horizon_s(self, slot: _Slot, bs: int, host_place: KvPlace) -> float:
        """Wait below which a host job is brought back (its swap-in would not be hidden)."""
        moved = place_blocks(host_place, slot.num_private_tokens, bs)
        return self.prefetch_factor * self.costs.transfer_s(moved) + self.prefetch_lead_s

    def _cheapest_downgrade(self, slots: list[_Slot], bs: int, host_free: int, deficit: int,
                            allowed: frozenset[KvPlace], reuse_blocks_per_s: float | None
                            ) -> tuple[_Slot, KvPlace] | None:
        """The cheapest move that frees ``deficit`` blocks on its own, else the cheapest per
        block freed (ties: the longest wait). A drop's recompute is priced from the prefix its
        worker's cache still holds at the resume: the blocks that cover the deficit are handed
        out at once, and ``reuse_blocks_per_s`` more over the job's wait."""
        best = None
        best_key: tuple[int, float, float] | None = None
        for slot in slots:
            held = slot.device_blocks(bs)
            if held == 0:
                continue
            now_cost = self._cost(slot, slot.place, bs)
            for target in PLACES[slot.place].downgrades:
                if target not in allowed and target is not KvPlace.NONE:
                    continue
                freed = held - (place_blocks(target, slot.num_private_tokens, bs)
                                if PLACES[target].on_device else 0)
                host_need = (place_blocks(target, slot.num_private_tokens, bs)
                             if PLACES[target].on_host else 0)
                if freed <= 0 or host_need > host_free:
                    continue
                kept = 0
                if target is KvPlace.NONE and reuse_blocks_per_s is not None:
                    reused = min(deficit, freed) + int(reuse_blocks_per_s * slot.wait_s)
                    kept = drop_kept_tokens(slot.job, slot.source, bs, reused)
                cost = self._cost(slot, target, bs, kept) - now_cost
                key = (0, cost, -slot.wait_s) if freed >= deficit else (1, cost / freed, -slot.wait_s)
                if best_key is None or key < best_key:
                    best, best_key = (slot, target), key
        return best

    def _cost(self, slot: _Slot, target: KvPlace, bs: int, num_kept_tokens: int = 0) -> float:
        return self.costs.place_cost_s(slot.job, slot.source, target, slot.wait_s, bs, num_kept_tokens)




def make_memory_planner(name: str, latency: LatencyModel, **cost_kwargs) -> MemoryPlanner:
    """``adaptive`` (all actions), ``drop`` (keep or recompute: the baseline), ``swap`` (keep,
    host, drop) and ``quantize`` (keep, int8, int4, drop) for ablations."""
    if name == "drop":
        return DropPlanner()
    allowed = {
        "adaptive": frozenset(KvPlace),
        "swap": frozenset({KvPlace.DEVICE, KvPlace.HOST, KvPlace.NONE}),
        "quantize": frozenset({KvPlace.DEVICE, KvPlace.DEVICE_INT8, KvPlace.DEVICE_INT4,
                               KvPlace.NONE}),
    }.get(name)
    if allowed is None:
        raise ValueError(f"unknown KV planner {name!r}; choose one of {', '.join(PLANNER_NAMES)}")
    return AdaptivePlanner(KvCostModel(latency, **cost_kwargs), allowed=allowed)
