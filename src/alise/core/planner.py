"""One worker's next step, planned in named phases (``StepPlanner.schedule``).

Planning runs ahead of the workers: a plan is made on top of every step already planned for
the worker, before their reports are in (a job's projected tokens, see ``alise.core.job``).
The phases:

1. ``_candidates``   the worker's running and paused jobs, and the waiting jobs it may take;
2. ``_rank``         the policy's keys, ties by arrival and job id; non-preemptive policies
                     keep running jobs first;
3. ``_select``       the walk within the sequence, block and token budgets (chunked prefill,
                     :func:`~alise.core.admission.select`);
4. ``_plan_memory``  a KV place for each of the worker's jobs that does not run (the memory
                     planner);
5. ``_start``        admit or resume the selected jobs that are not running;
6. ``_advance``      project the step: computed tokens and pending outputs of each job fed.

Block accounting is exact (the worker allocates by the same formulas), so a plan never asks
a worker for more blocks than it has; jobs that finish early only leave it more. A waiting
job's prefix cached on the worker (its ``alise.core.prefix_mirror``) is not fed, and its
shared blocks are counted once.

The planner reads the core's job table, policy, router and workers, and changes a job's
status only through the core's one status-change path (``set_status``); what the plans did
is counted here (preemptions, KV moves, prefill tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np

from alise.core.admission import Budgets, growth_blocks, select
from alise.core.blocks import blocks_for, blocks_for_each
from alise.core.commands import Admit, Command, KvAction, Pause, Resume, StepPlan
from alise.core.job import JobStatus, KvPlace
from alise.core.kv_places import PLACES, move_label
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import KvMove, MemoryPlanner
from alise.core.policy import Policy, RemainingTimeEstimator
from alise.core.prefix_mirror import PrefillCounts, known_tokens
from alise.core.reports import InFlight
from alise.core.routing import Router
from alise.core.table import WAITING, JobTable
from alise.core.waits import ExpectedWaits
from alise.core.worker_view import WorkerView

#: Read on every admit (a module global is read faster than an enum's member).
_WAITING, _RUNNING = JobStatus.WAITING, JobStatus.RUNNING

#: The smallest prompt chunk a step's latency allowance is rounded up to.
MIN_CHUNK_TOKENS = 16


class StepPlanner:
    """Makes one worker's next plan from the core's state; the core's ``schedule`` calls it."""

    def __init__(self, table: JobTable, policy: Policy, estimator: RemainingTimeEstimator,
                 memory: MemoryPlanner, router: Router, workers: dict[str, WorkerView],
                 set_status: Callable[..., None], prefill_step_ratio: float) -> None:
        self.table = table
        self.policy = policy
        self.estimator = estimator
        self.memory = memory
        self.router = router
        #: The core's workers (the same dict).
        self.workers = workers
        #: The core's status change of a job: ``set_status(job, status, now_s, **fields)``.
        self.set_status = set_status
        #: A step that carries prompt chunks beside decodes may cost at most this many times the
        #: decode step alone (by a measured latency model; not capped under the default one).
        self.prefill_step_ratio = prefill_step_ratio
        #: Preemptions by action.
        self.preemptions: Counter[str] = Counter()
        #: KV moves by kind (keep, int8, int4, swap, swap-int8, swap-int4, drop, prefetch).
        self.kv_moves: Counter[str] = Counter()
        #: Tokens admitted, found in a prefix cache, and computed by prefills (recomputes too).
        self.prefill = PrefillCounts()
        #: Each worker's last ranking under a preemptive policy: (its candidates in rank
        #: order, which slots they were), where the next ranking's sort starts (``_rank``).
        self._last_ranks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def latency(self) -> LatencyModel:
        return self.estimator.latency

    def schedule(self, view: WorkerView, now_s: float, *, census: bool = False) -> StepPlan:
        """The worker's next plan (``SchedulerCore.schedule``)."""
        is_candidate, on_worker, held = self._candidates(view)
        order, reserve = self._rank(view.index, is_candidate, now_s)
        num_tokens = self.table.num_tokens[order]
        need, hits = self._needs(view, order, num_tokens)
        held += view.num_shared_blocks  # and the shared prefix blocks, counted once
        taken, feed = self._select(view, order, num_tokens, need, reserve, held, hits)
        chosen = order[taken]
        commands = self._plan_memory(view, order, on_worker, taken, chosen, need, held, now_s)
        commands += self._start(view, chosen, None if hits is None else hits[taken], now_s)
        num_fed = int(np.count_nonzero(feed))
        chunks, outputs = self._advance(view, chosen, feed, num_fed)
        plan = StepPlan(step_id=view.next_step_id, commands=commands, run_step=num_fed > 0, chunks=chunks,
                        census=census)
        if not plan.is_empty:
            view.next_step_id += 1
            view.in_flight.append(InFlight.of(plan.step_id, outputs, plan.commands, census=census, planned_free_blocks=(
                view.num_free_device_blocks if census else 0)))
        return plan

    def _candidates(self, view: WorkerView) -> tuple[np.ndarray, np.ndarray, int]:
        """(which slots of the table are the step's candidates, which of them are the worker's
        own jobs, device blocks held by running jobs whose last token is in flight: they end
        with it, so they are not candidates)."""
        table, cap = self.table, view.capacity
        owner, num_tokens = table.owner, table.num_tokens
        mine = owner == view.index
        # A job ends at its prompt and max_tokens, or at max_model_len (integers: the first).
        done = num_tokens >= np.minimum(table.max_num_tokens, cap.max_model_len)
        done &= mine
        done &= table.is_running
        held = 0
        finishing = done.nonzero()[0]
        if len(finishing):  # (one or two most steps: summed as numbers)
            mine[finishing] = False
            computed = table.num_computed_tokens[finishing].tolist()
            shared = table.num_shared_tokens[finishing].tolist()
            held = sum(blocks_for(c - s, cap.block_size) for c, s in zip(computed, shared, strict=True))
        waiting = (owner == WAITING) & (num_tokens < cap.max_model_len)
        if len(self.workers) > 1:
            self.router.route_new((owner == WAITING).nonzero()[0], self.latency.correction, self._prefix_saving_s)
            if view.jobs:  # an idle worker takes jobs routed elsewhere rather than idle
                waiting &= table.route == view.index
        return mine | waiting, mine, held

    def _rank(self, index: int, is_candidate: np.ndarray,
              now_s: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(the candidates' slots in the policy's order, their growth reserves in tokens or
        None) on the worker of ``index``. Order: key, then arrival and job id (tie labels);
        running jobs first for a non-preemptive policy."""
        policy, table = self.policy, self.table
        if policy.preemptive:
            slots = self._in_last_order(index, is_candidate)
        else:  # NOTE: in tie order, so a stable sort by key alone breaks ties by the label
            tied = table.tie_order
            slots = tied[is_candidate[tied]]
        if not len(slots):
            return slots, None
        cands = table.candidates(slots)
        keys = policy.keys(cands, now_s)
        if policy.preemptive:
            perm = sort_by_key_and_label(keys, table.tie_label, slots)
            order = slots[perm]
            self._last_ranks[index] = order, is_candidate
            if len(self._last_ranks) > len(self.workers):  # a worker left: its ranking goes
                live = {view.index for view in self.workers.values()}
                self._last_ranks = {i: last for i, last in self._last_ranks.items() if i in live}
        else:  # running first, each part by key (fcfs: by arrival, found in order at once)
            running, parts = cands.running, []
            for part in (running.nonzero()[0], (~running).nonzero()[0]):
                parts.append(part[stable_argsort(keys[part])])
            perm = np.concatenate(parts)
            order = slots[perm]
        reserve = policy.reserve_tokens(cands)
        return order, None if reserve is None else reserve[perm]

    def _in_last_order(self, index: int, is_candidate: np.ndarray) -> np.ndarray:
        """The candidates' slots: those of the worker's last ranking in its order, then the
        others. From one plan to the next few keys change places (waiting jobs age alike,
        running ones move by a token's time), so their sort finds them nearly in order."""
        last = self._last_ranks.get(index)
        if last is None or len(last[1]) != len(is_candidate):  # none yet, or the table grew
            return is_candidate.nonzero()[0]
        order, was_candidate = last
        # ``>`` on booleans: a candidate now that was not one then
        return np.concatenate((order[is_candidate[order]], (is_candidate > was_candidate).nonzero()[0]))

    def _needs(self, view: WorkerView, order: np.ndarray,
               num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(device blocks each candidate needs to run, tokens of each waiting or dropped one's
        prefix cached on the worker: None where it caches none); ``num_tokens``: the candidates'
        token counts. Shared blocks count once, in ``view.num_shared_blocks``; a hit on cached
        blocks no job reads takes those out of the free ones."""
        table, bs = self.table, view.capacity.block_size
        private = num_tokens - table.num_shared_tokens[order]
        if view.prefix is None:
            return blocks_for_each(private, bs), None
        hits = np.zeros(len(order), dtype=np.int64)
        taken_free = np.zeros(len(order), dtype=np.int64)
        # A step takes at most max_num_seqs jobs, so the lookups stop at that many waiting or
        # dropped ones (bounded work per plan); one ranked below them that backfill takes starts
        # uncached. A dropped job is paused here with nothing computed.
        owner = table.owner[order]
        dropped = (owner == view.index) & ~table.is_running[order] & (table.num_computed_tokens[order] == 0)
        resumes = []
        for i in ((owner == WAITING) | dropped).nonzero()[0][:view.capacity.max_num_seqs].tolist():
            job = table.jobs[order[i]]
            if job.status is JobStatus.WAITING or job.is_dropped:
                hits[i], taken_free[i] = view.prefix.lookup(job)
                if job.is_dropped:
                    resumes.append(i)
        # A dropped job's remaining time prices the recompute of what its prefix cache does not
        # hold (``SchedulerCore._put``), which grows as the worker evicts its blocks.
        table.update_cached_hints(order[resumes], hits[resumes])
        return blocks_for_each(private - hits, bs) + taken_free, hits

    def _prefix_saving_s(self, slot: int, index: int) -> float:
        """Seconds of prefill a waiting job saves on the worker of ``index`` (its cached prefix)."""
        view = next((v for v in self.workers.values() if v.index == index), None)
        if view is None or view.prefix is None:
            return 0.0
        hit, _ = view.prefix.lookup(self.table.jobs[slot])
        n, lat = int(self.table.num_tokens[slot]), self.latency
        return float(lat.recompute_base_s(n) - lat.recompute_base_s(n, hit)) * lat.correction if hit else 0.0

    def _select(self, view: WorkerView, order: np.ndarray, num_tokens: np.ndarray, need: np.ndarray,
                reserve: np.ndarray | None, held: int, hits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        cap, table = view.capacity, self.table
        grow = None if reserve is None else growth_blocks(reserve, need, cap.num_device_blocks, cap.block_size)
        running = table.is_running[order]
        uncomputed = num_tokens - table.num_computed_tokens[order]
        if hits is not None:
            uncomputed -= hits
        decode = running & (uncomputed == 1)
        num_decodes = int(np.count_nonzero(decode))
        budgets = Budgets(cap.max_num_seqs, cap.num_device_blocks - held, cap.max_num_batched_tokens,
                          self._prefill_allowance(num_tokens, decode, num_decodes))
        return select(need, uncomputed, running, budgets, self.policy.backfill, grow, decode, num_decodes)

    def _prefill_allowance(self, num_tokens: np.ndarray, decoding: np.ndarray, num_decodes: int) -> int | None:
        """Prompt tokens the step may add beside its ``num_decodes`` decodes (``decoding``;
        ``LatencyModel.chunk_allowance``), at least ``MIN_CHUNK_TOKENS`` so prompts always
        progress; None where unpriced."""
        latency = self.latency
        if not latency.measured or not self.prefill_step_ratio:
            return None
        context = int(num_tokens.dot(decoding))  # the decodes' tokens (integers: exact; ``dot`` is cheaper than ``@``)
        allowance = latency.chunk_allowance(num_decodes, context, self.prefill_step_ratio)
        return None if allowance is None else max(allowance, MIN_CHUNK_TOKENS)

    def _plan_memory(self, view: WorkerView, order: np.ndarray, on_worker: np.ndarray, taken: np.ndarray,
                     chosen: np.ndarray, need: np.ndarray, held: int, now_s: float) -> list[Command]:
        """KV places for the worker's jobs that do not run (best-ranked first); ``on_worker``: the
        slots of the worker's candidates; those that run, ``chosen``, need ``need[taken]`` blocks."""
        if np.count_nonzero(on_worker) == np.count_nonzero(on_worker[chosen]):  # (most plans: all run)
            return []
        table, cap = self.table, view.capacity
        left = on_worker[order]
        left[taken] = False
        positions = left.nonzero()[0]
        paused = table.jobs[order[positions]].tolist()
        waits: Mapping[str, float] = {}
        if self.memory.uses_waits:  # the wait of a job: the remaining time of every job ahead
            waits = ExpectedWaits(table, order, positions, [job.job_id for job in paused], self.latency.correction)
        # NOTE: a running job holds no host blocks, so the finishing ones ``on_worker`` leaves out count 0.
        host_used = int(table.num_host_blocks @ on_worker)
        used = int(need[taken].sum()) + held
        moves = self.memory.plan(paused, waits, cap, cap.num_device_blocks - used,
                                 cap.num_host_blocks - host_used, self._reuse_blocks_per_s(view, chosen))
        # Device-freeing moves first: the worker applies commands in order, and a prefetch
        # (host -> device) may need the blocks that a swap-out or quantization frees.
        moves.sort(key=lambda move: PLACES[move.job.kv].on_host)
        commands: list[Command] = []
        for move in moves:
            commands += self._apply_move(move, now_s)
        return commands

    def _reuse_blocks_per_s(self, view: WorkerView, runs: np.ndarray) -> float | None:
        """How fast the worker hands out freed blocks while the jobs ``runs`` run (each takes a
        block every ``block_size`` tokens, a token a step), evicting the prefixes that drops
        leave in its cache; None where it caches none."""
        if view.prefix is None:
            return None
        if not len(runs):
            return 0.0
        step_s = self.latency.step_s(len(runs), int(self.table.num_tokens[runs].sum()))
        return len(runs) / view.capacity.block_size / step_s

    def _apply_move(self, move: KvMove, now_s: float) -> list[Command]:
        job, actions = move.job, move.actions
        self.kv_moves[move_label(job.kv, move.target)] += 1
        if job.status is JobStatus.RUNNING:
            actions = actions or (KvAction.KEEP,)
            self.preemptions[actions[0].value] += 1
        # A drop caches the full blocks of every token known now that the worker will have
        # computed when it applies the drop (``reusable_tokens``; the mirror's release agrees).
        known = known_tokens(job)
        if move.target is KvPlace.NONE:  # the prefill counted computed when planned, less what it never ran
            self.prefill.num_computed_tokens -= max(0, job.prefill_end - job.num_computed_tokens)
        self.set_status(job, JobStatus.PAUSED, now_s, kv=move.target)
        if job.is_dropped:  # what its worker's cache kept, as its row's price reads it
            self.prefill.num_drop_cached_tokens += int(self.table.num_cached_hint[self.table.slot_of[job.job_id]])
        return [Pause(job.job_id, action, known if action is KvAction.DROP else 0) for action in actions]

    def _start(self, view: WorkerView, chosen: np.ndarray, hits: np.ndarray | None, now_s: float) -> list[Command]:
        """Admits or resumes the jobs ``chosen`` that are not running; ``hits``: their cached
        prefixes' tokens (``_needs``; None: the worker caches none)."""
        table, counts, prefix, set_status = self.table, self.prefill, view.prefix, self.set_status
        worker_id, step_id = view.worker_id, view.next_step_id  # admit_step_id: the plan being made
        starts = ~table.is_running[chosen]
        jobs = table.jobs[chosen[starts]].tolist()
        commands: list[Command] = []
        for job, hit in zip(jobs, [0] * len(jobs) if hits is None else hits[starts].tolist(), strict=True):
            if job.status is _WAITING:
                cached = prefix.admit(job, hit) if prefix is not None else 0
                if cached:  # (a waiting job has none computed: ``Job.transition``)
                    job.num_computed_tokens = job.num_shared_tokens = cached
                tokens = job.all_token_ids()
                num_generated, admitted = len(job.output_token_ids), len(tokens)
                counts.num_admitted_tokens += admitted
                counts.num_cached_tokens += cached
                counts.num_computed_tokens += admitted - cached
                job.prefill_end = admitted
                commands.append(Admit(job.job_id, tokens, job.worker_sampling, num_generated, cached))
                set_status(job, _RUNNING, now_s, worker_id=worker_id, admit_step_id=step_id)
            else:
                cached = 0
                if job.kv is KvPlace.NONE:  # a recompute after a drop, less its cached prefix
                    cached = prefix.resume(job, hit) if prefix is not None else 0
                    job.num_computed_tokens = job.num_shared_tokens = cached
                    counts.num_computed_tokens += job.num_tokens - cached
                    job.prefill_end = job.num_tokens
                    counts.num_resume_cached_tokens += cached
                commands.append(Resume(job.job_id, num_cached_tokens=cached))
                set_status(job, _RUNNING, now_s)
        return commands

    def _advance(self, view: WorkerView, chosen: np.ndarray, feed: np.ndarray,
                 num_fed: int) -> tuple[dict[str, int], set[str]]:
        """Projects the step onto the jobs it feeds (``num_fed`` of ``chosen`` feed more than
        0): (plan chunks, jobs that output a token)."""
        table = self.table
        if num_fed == len(feed):  # (most steps: every job taken is fed)
            slots, n = chosen, feed
        else:
            fed = feed.nonzero()[0]  # feeds are never negative
            slots, n = chosen[fed], feed[fed]
        # The table's token counts are the jobs' own (``ProjectedCount``): only this projection
        # and the jobs' status changes write them (a report confirms a pending token per output,
        # which leaves ``num_tokens`` as it is).
        num_tokens, num_computed = table.num_tokens[slots], table.num_computed_tokens[slots]
        computed = num_computed + n
        out = computed == num_tokens
        job_ids = table.job_ids[slots]
        # (the few jobs in a prefill, most steps one to three: read one by one)
        chunks = {job_ids[i]: n.item(i) for i in (num_tokens - num_computed > 1).nonzero()[0].tolist()}
        # NOTE: a plan feeds a job at most once, so ``slots`` are distinct.
        table.num_computed_tokens[slots] = computed
        table.num_tokens[slots] = num_tokens + out  # a pending output each (``PendingOutputs``)
        table.is_stale[slots] = True
        if view.prefix is not None:  # the blocks the worker allocates for the feed
            bs = view.capacity.block_size
            for job, k in zip(table.jobs[slots].tolist(), computed.tolist(), strict=True):
                view.prefix.resize(job, blocks_for(k, bs))
        return chunks, set(job_ids[out].tolist())


def sort_by_key_and_label(keys: np.ndarray, labels: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The permutation that orders ``keys`` (of the rows ``slots``, in any order), equal keys by
    the rows' distinct ``labels``: the stable sort by key of the same rows taken in label order.
    Timsort finds keys that come nearly in order fast; where the sorted keys strictly increase
    there are no ties to break (a NaN, which no comparison holds for, goes to the lexsort)."""
    perm = keys.argsort(kind="stable")
    ordered = keys[perm]
    if np.count_nonzero(ordered[1:] > ordered[:-1]) == len(ordered) - 1:  # (a count is cheaper than ``all``)
        return perm
    return np.lexsort((labels[slots], keys))


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")``, by the faster unstable sort: where the sorted keys
    strictly increase the order is the same; where some are equal, only the runs of equal keys
    are put back in position order."""
    return np.arange(len(keys)) if in_key_order(keys) else sort_out_of_order(keys)


def in_key_order(keys: np.ndarray) -> bool:
    """Whether ``keys`` never decrease (then their stable sort leaves them where they are;
    fcfs: the candidates come by arrival). Three keys out of order say no at once (alise's
    keys, most steps); a NaN, which no comparison holds for, too."""
    last = len(keys) - 1
    return last < 1 or bool(keys[0] <= keys[last // 2] <= keys[last]
                            and np.count_nonzero(keys[1:] >= keys[:-1]) == last)


def sort_out_of_order(keys: np.ndarray) -> np.ndarray:
    """:func:`stable_argsort` of keys known not to be in order."""
    perm = keys.argsort()
    ordered = keys[perm]
    rises = ordered[1:] > ordered[:-1]
    if np.count_nonzero(rises) == len(rises):  # (a count is cheaper than ``all``)
        return perm
    if np.isnan(ordered[-1]):  # NaN sorts last; with one, "not rising" is not "equal"
        return keys.argsort(kind="stable")
    pairs = (~rises).nonzero()[0].tolist()  # ordered[a] == ordered[a + 1]
    if len(pairs) > 16:  # many ties: the stable sort is the cheaper
        return keys.argsort(kind="stable")
    start = end = pairs[0]
    for a in [*pairs[1:], -2]:
        if a != end + 1:  # the run of equal keys ordered[start:end + 2] ends
            perm[start:end + 2].sort()
            start = a
        end = a
    return perm
