"""Discrete-event simulation of a cluster: the real scheduler core, virtual workers, virtual time.

The simulator replays a trace against the same ``SchedulerCore`` (policy, ordering,
selection, memory planning, block accounting) that the scheduler service runs, and against
the worker's own engine (``alise.tools.sim.virtual_worker``: the engine's commands, chunked feeds,
KV state machine and block ids, with a latency model for the forward pass). Only time is
virtual: a step lasts what the ``LatencyModel`` says (KV copies and quantization included).

Events are arrivals and step ends; as in the service, the core plans each worker's steps
ahead (``SchedulingConfig.min_plans_ahead`` to ``plans_ahead``, by the service's rule,
``alise.core.dispatch.FlightDepth``), so a step runs the decisions made while the steps
before it ran. Planning takes no virtual time, so a worker is never found waiting for a plan
and keeps ``min_plans_ahead`` in flight. A job's latency is measured from its arrival to the
end of the step that produced its last token; normalized latency is that over its output
tokens.
Every result is labelled "simulated" with the profile's name.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from alise.core.blocks import WorkerCapacity, default_token_budget
from alise.core.build import make_core
from alise.core.commands import AbortJobs, StepPlan, StepReport
from alise.core.config import SchedulingConfig, check_choices
from alise.core.dispatch import FlightDepth, has_running, keep_in_flight
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.memory_planner import MemoryPlanner
from alise.core.prefix_mirror import PrefillCounts
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.tools.sim.virtual_worker import EOS_TOKEN_ID, virtual_worker
from alise.tools.trace import Releases, TraceRequest, conversations


@dataclass(frozen=True)
class SimConfig:
    """One simulated worker's shape (every worker alike) and the cluster size."""

    #: KV room in tokens per worker at 16 bits a value (default: OPT-13B on an H100, the issue's
    #: reference); fp8 pages hold twice as many in the same memory (``kv_cache_dtype``).
    kv_tokens: int = 15_000
    block_size: int = 16
    #: The workers' KV pages (their kv_cache_dtype): fp8_e4m3 halves a token's bytes, so the blocks
    #: double, a block's bytes halve and so does the profile's per-context-token cost.
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    max_num_seqs: int = 256
    #: The per-step token budget (chunked prefill); 0 = the worker's default rule.
    max_num_batched_tokens: int = 0
    max_model_len: int = 2048
    num_workers: int = 1
    #: max_tokens of every request: a generous cap, not the true length (which the policy
    #: must not see); each job carries its trace length as ``oracle_output_tokens``
    #: and ends there (``Job.worker_sampling``), as on the real path.
    max_tokens: int = 2048
    #: What the scheduler service would be given (``alise scheduler``'s scheduling flags): the
    #: policy and its knobs, the KV planner, the prefill step cap (which the capacity bound
    #: does not include) and the plans in flight per worker.
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    #: Host KV blocks per worker, bytes of a full-precision block, and the KV moves' rates
    #: (swaps on one copy engine; quantize / dequantize on the compute stream).
    num_host_blocks: int = 0
    block_bytes: int = 0
    swap_bytes_per_s: float = 20e9
    quantize_bytes_per_s: float = 200e9
    #: The workers keep released full KV blocks for later prompts that start with the same
    #: tokens (their --enable-prefix-caching); here only a conversation's later turns share a
    #: prefix (``prompt_token_ids``).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("kv_tokens", "block_size", "max_num_seqs", "max_model_len", "num_workers", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def kv_bytes_ratio(self) -> float:
        """A token's KV bytes over a 16-bit cache's."""
        return 0.5 if self.kv_cache_dtype == "fp8_e4m3" else 1.0

    @property
    def num_device_blocks(self) -> int:
        return int(self.kv_tokens / self.kv_bytes_ratio) // self.block_size

    @property
    def kv_room_tokens(self) -> int:
        """Tokens the device blocks hold."""
        return self.num_device_blocks * self.block_size

    def kv_latency(self, model: LatencyModel) -> LatencyModel:
        """``model`` (a profile of 16-bit pages) for these workers' pages."""
        return model if self.kv_bytes_ratio == 1.0 else model.with_kv_bytes_ratio(self.kv_bytes_ratio)

    def capacity(self, worker_id: str) -> WorkerCapacity:
        budget = self.max_num_batched_tokens or default_token_budget(self.max_num_seqs)
        return WorkerCapacity(worker_id, self.block_size, self.num_device_blocks, self.num_host_blocks,
                              self.max_model_len, self.max_num_seqs, budget,
                              block_bytes=int(self.block_bytes * self.kv_bytes_ratio),
                              prefix_caching=self.enable_prefix_caching, kv_cache_dtype=self.kv_cache_dtype)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    num_preemptions: int

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def normalized_latency_s(self) -> float:
        return self.e2e_s / max(self.output_tokens, 1)


@dataclass
class SimResult:
    policy: str
    profile: str
    records: list[JobRecord]
    makespan_s: float
    num_steps: int
    preemptions: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    label: str = "simulated"
    #: The work backlog just after each arrival (in arrival order): decode steps still to run
    #: (one an output token), as a share of the trace's (:class:`WorkMeter`). In a run that
    #: keeps up it is the work in flight and stays level; in overload it grows.
    work_backlog: list[float] = field(default_factory=list)
    #: The same in KV token-steps: a token decoded from a context of 1,500 counts 15 times one
    #: decoded from 100. Reported beside the rule, not in it (see :class:`WorkMeter`).
    kv_backlog: list[float] = field(default_factory=list)
    #: KV moves by kind (``SchedulerCore.kv_moves``), bytes each way, and the most device
    #: blocks the unfinished jobs ever needed at once (memory unlimited: the peak need).
    kv_moves: Counter = field(default_factory=Counter)
    moved_bytes: dict[str, int] = field(default_factory=dict)
    peak_need_blocks: int = 0
    #: Prompt tokens admitted, found in the workers' prefix caches, and computed by prefills.
    prefill: PrefillCounts = field(default_factory=PrefillCounts)

    @property
    def work_backlog_at_last_arrival(self) -> float:
        return self.work_backlog[-1] if self.work_backlog else 0.0

    @property
    def work_backlog_at_mid_arrival(self) -> float:
        return self.work_backlog[(len(self.work_backlog) + 1) // 2 - 1] if self.work_backlog else 0.0

    @property
    def work_backlog_growth(self) -> float:
        return backlog_growth(self.work_backlog)

    @property
    def kv_backlog_growth(self) -> float:
        return backlog_growth(self.kv_backlog)


def simulate(requests: Sequence[TraceRequest], latency: LatencyModel, config: SimConfig = SimConfig(), *,
             estimates: Mapping[int, LengthEstimate] | None = None,
             memory: MemoryPlanner | None = None, pricing: LatencyModel | None = None,
             max_steps: int = 5_000_000, on_progress: Callable[[int], None] | None = None) -> SimResult:
    """Replays ``requests`` (in arrival order; a conversation's later turns as
    ``trace.Releases`` says: after the turn before ends) through the core that
    ``config.scheduling`` describes, its steps timed by ``latency``; ``estimates`` by request
    index; ``memory``: the KV planner (default: ``config.scheduling``'s); ``pricing``: the
    latency model the core prices with (default: ``latency``); ``on_progress``: called with the
    number of jobs finished so far at every event (it keeps its own pace).

    Job ids are ``r`` and the request's index, zero-padded to one width: the core breaks a tie
    between equal arrival times by job id, so requests that arrive at the same moment (a burst,
    a trace sent all at once) queue in the trace's order, as the scheduler service queues a
    client's requests in the order it receives them ("r10" before "r2" would not)."""
    started = time.perf_counter()
    latency = config.kv_latency(latency)
    pricing = config.kv_latency(pricing) if pricing is not None else None
    core = make_core(config.scheduling, pricing or latency, memory)
    cluster = _Cluster(core, config, latency)
    releases = Releases(requests)
    jobs: dict[str, Job] = {}
    sampling = SamplingParams(max_tokens=config.max_tokens, ignore_eos=True)
    now = 0.0
    max_len = min(config.max_model_len, config.num_device_blocks * config.block_size)
    ids = job_ids_by_index(len(requests))
    meter = WorkMeter({ids[i]: (r.prompt_tokens, output_target(r.prompt_tokens, r.output_tokens,
                                                                config.max_tokens, max_len))
                       for i, r in enumerate(requests)})
    backlog: list[tuple[float, float]] = []
    peak_need = 0
    previous = {turns[k + 1]: turns[k] for turns in conversations(requests).values() for k in range(len(turns) - 1)}
    while releases or core.jobs:
        if cluster.num_steps > max_steps:
            raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        t_arrival = releases.next_s()
        t_step = cluster.next_end_s()
        if on_progress is not None:
            on_progress(len(jobs) - len(core.jobs))
        if t_step is not None and (t_arrival is None or t_step <= t_arrival):
            now = t_step
            cluster.end_step(now)
        elif t_arrival is not None:
            now = t_arrival
            for i, released_s in releases.pop_due(now):
                r = requests[i]
                job_id = ids[i]
                before = jobs.get(ids[previous[i]]) if i in previous else None
                job = Job(job_id, prompt_token_ids(i, r.prompt_tokens, before), sampling, arrival_s=released_s,
                          estimate=estimates.get(i) if estimates else None,
                          oracle_output_tokens=r.output_tokens)
                jobs[job_id] = job
                core.submit(job)
            left = meter.left(core.jobs.values())
            backlog.extend([left] * (len(jobs) - len(backlog)))
            need = sum(-(-job.num_tokens // config.block_size) for job in core.jobs.values())
            peak_need = max(peak_need, need)
        else:
            raise RuntimeError("simulation stalled: jobs left but no worker can run them")
        cluster.plan(now)
        for i in releases.awaited():  # a finished turn releases the next one of its conversation
            if jobs[ids[i]].is_finished:
                releases.finished(i, jobs[ids[i]].finish_s)
        if cluster.next_end_s() is None and releases.next_s() is None and core.jobs:
            raise RuntimeError(f"simulation stalled with {len(core.jobs)} jobs that fit no worker")
    records = []
    for job_id, job in jobs.items():
        records.append(JobRecord(job_id, job.num_prompt_tokens, job.num_output_tokens,
                                 job.arrival_s, job.first_token_s or job.finish_s or 0.0,
                                 job.finish_s or 0.0, job.num_preemptions))
    moved: Counter = Counter()
    for worker in cluster.workers.values():
        moved.update(worker.executor.mover.moved_bytes)
    return SimResult(core.policy.name, latency.name, records, now, cluster.num_steps,
                     Counter(core.preemptions),
                     time.perf_counter() - started, work_backlog=[b[0] for b in backlog],
                     kv_backlog=[b[1] for b in backlog], kv_moves=Counter(core.kv_moves),
                     moved_bytes=dict(moved), peak_need_blocks=peak_need, prefill=core.prefill)


def job_ids_by_index(num_requests: int) -> list[str]:
    """The simulated jobs' ids by request index: increasing as strings too (see :func:`simulate`)."""
    width = len(str(max(num_requests - 1, 0)))
    return [f"r{i:0{width}d}" for i in range(num_requests)]


def prompt_token_ids(index: int, num_tokens: int, previous: Job | None) -> list[int]:
    """A simulated prompt's token ids: a later turn of a conversation starts with the turn
    before it, prompt and answer, as a chat template renders them; the rest are tokens of its
    own (a fixed random draw per request), so prompts share a prefix only where a conversation
    does (a system prompt shared by every request is not modelled)."""
    own = np.random.default_rng(index).integers(1, EOS_TOKEN_ID, num_tokens).tolist()
    if previous is None:
        return own
    head = previous.all_token_ids()[:num_tokens]
    return head + own[len(head):]


class _Cluster:
    """The simulated workers and the plans in flight on each, on the virtual clock.

    As in the service's engine, the core keeps each worker's ``FlightDepth`` of plans in
    flight: a step's report is applied when the step ends, at which moment the worker starts
    its next plan (planned while earlier steps ran) and the core tops its plans up."""

    def __init__(self, core: SchedulerCore, config: SimConfig, latency: LatencyModel) -> None:
        self.core = core
        scheduling = config.scheduling
        self.depths: dict[str, FlightDepth] = {}
        self.step_s: dict[str, float] = {}  # worker -> its last step's duration
        self.workers = {}
        self.queued: dict[str, deque] = {}
        self.running: dict[str, tuple[float, StepReport]] = {}  # worker -> (end, report)
        self.num_steps = 0
        for w in range(config.num_workers):
            wid = f"w{w}"
            core.add_worker(config.capacity(wid))
            self.workers[wid] = virtual_worker(
                num_device_blocks=config.num_device_blocks, block_size=config.block_size,
                max_model_len=config.max_model_len, latency=latency, num_host_blocks=config.num_host_blocks,
                block_bytes=config.block_bytes, swap_bytes_per_s=config.swap_bytes_per_s,
                quantize_bytes_per_s=config.quantize_bytes_per_s, prefix_caching=config.enable_prefix_caching)
            self.queued[wid] = deque()
            self.depths[wid] = FlightDepth(scheduling.min_plans_ahead, scheduling.plans_ahead)
            self.step_s[wid] = 0.0

    def next_end_s(self) -> float | None:
        return min((end for end, _ in self.running.values()), default=None)

    def end_step(self, now: float) -> None:
        for wid in sorted(w for w, (end, _) in self.running.items() if end <= now):
            _, report = self.running.pop(wid)
            # The worker starts its next plan at once (planned while this step ran), so this
            # report does not change it; reports are applied in step order.
            self.core.apply_report(wid, report, now)
            self._start_next(wid, now)

    def plan(self, now: float) -> None:
        """Each worker's aborts and plans, as the service's engine sends them; an idle worker
        starts at once (a plan without a step is done at once and frees its place in flight)."""
        for wid in sorted(self.workers):
            worker, depth = self.workers[wid], self.depths[wid]
            depth.dispatching(now, self.core.num_in_flight(wid), has_running(self.core, wid), self.step_s[wid])
            while True:
                messages = keep_in_flight(self.core, wid, now, plans_ahead=depth.depth)
                depth.sent(now, sum(isinstance(m, StepPlan) for m in messages), self.core.num_in_flight(wid))
                for message in messages:
                    match message:
                        case AbortJobs(job_ids, through):
                            # The virtual worker already holds the state at the end of its
                            # running step: now is its next step boundary.
                            worker.abort(job_ids, through)
                        case StepPlan():
                            self.queued[wid].append(message)
                if wid not in self.running:
                    self._start_next(wid, now)
                if not any(isinstance(m, StepPlan) for m in messages):
                    break

    def _start_next(self, wid: str, now: float) -> None:
        """The worker runs its next queued plan from ``now``; a plan without a step is done at once."""
        queue, worker = self.queued[wid], self.workers[wid]
        while queue:
            plan = queue.popleft()
            worker.executor.mover.clock_s = max(worker.executor.mover.clock_s, now)
            report = worker.run(plan)
            broken = [r for r in report.refused if r.command in ("step", "chunk")]
            if broken:
                raise RuntimeError(f"worker {wid}: a plan the worker could not run: {broken}")
            if plan.run_step and report.step_duration_s > 0:
                self.running[wid] = (now + report.step_duration_s, report)
                self.step_s[wid] = report.step_duration_s
                self.num_steps += 1
                return
            self.core.apply_report(wid, report, now)


def output_target(prompt_tokens: int, output_tokens: int, max_tokens: int, max_len: int) -> int:
    """Tokens a job of this trace length really generates: it also stops at its request's
    ``max_tokens`` and where its sequence fills ``max_len`` (the model's or the worker's
    whole KV, whichever is smaller); at least one."""
    return max(min(output_tokens, max_tokens, max_len - prompt_tokens), 1)


def decode_work(prompt_tokens: int, target: int, generated: int = 0) -> int:
    """KV token-steps a job of ``target`` output tokens still needs after ``generated``: it
    decodes its tokens max(generated + 1, 2) .. target (the first comes from the prefill), token
    k from a context of prompt_tokens + k - 1."""
    first = max(generated + 1, 2)
    if first > target:
        return 0
    return (target - first + 1) * (prompt_tokens - 1) + (target * (target + 1) - (first - 1) * first) // 2


class WorkMeter:
    """The work still to do in a trace, as a share of all of it, in two units.

    * Decode steps, one an output token (after the first, which the prefill makes): what the
      sustained rule counts. It does not depend on the order jobs are served in.
    * KV token-steps, the memory-time a step spends on a token (its context): where memory
      binds, the resource itself. A shortest-first policy works off cheap tokens (short
      contexts) first, so its backlog in decode steps can look level while the expensive
      tokens of the long jobs pile up; in KV token-steps they show. But a few long jobs hold
      most of a heavy-tailed trace's KV token-steps, so the count swings with which of them are
      in flight: on the 4,000-request alpaca trace (H100 profile) it grew 0.9 % of the work at
      50 req/s and 2.1 % at 70, every policy alike, with latency flat. Too noisy for a 2.5 %
      rule, so it is reported, not ruled on.
    """

    def __init__(self, jobs: Mapping[str, tuple[int, int]]):
        #: job id -> (prompt tokens, output tokens it will generate)
        self.jobs = dict(jobs)
        self.total_steps = sum(n - 1 for _, n in self.jobs.values()) or 1
        self.total_memory = sum(decode_work(p, n) for p, n in self.jobs.values()) or 1

    def steps_left(self, job_id: str, generated: int) -> int:
        return max(self.jobs[job_id][1] - max(generated, 1), 0)

    def memory_left(self, job_id: str, generated: int) -> int:
        p, n = self.jobs[job_id]
        return decode_work(p, n, generated)

    def left(self, jobs) -> tuple[float, float]:
        """Shares of the trace's (decode steps, KV token-steps) the unfinished ``jobs`` still need."""
        steps = memory = 0
        for job in jobs:
            if not job.is_finished:
                steps += self.steps_left(job.job_id, job.num_output_tokens)
                memory += self.memory_left(job.job_id, job.num_output_tokens)
        return steps / self.total_steps, memory / self.total_memory


def backlog_growth(samples: Sequence[float]) -> float:
    """How much a work backlog sampled at every arrival grew over the second half of them:
    its mean over the last quarter of arrivals minus its mean over the second quarter.

    Window means (their centres half the arrivals apart) rather than the backlog at two
    single arrivals: one long job arriving or finishing moves a point by several percent of
    a chat trace's work. The first quarter, where the run fills up, is left out. In overload
    by a fraction x the growth is about x / (2 (1 + x))."""
    n = len(samples)
    if n < 4:
        return samples[-1] - samples[0] if samples else 0.0
    early = samples[n // 4:n // 2]
    late = samples[(3 * n) // 4:]
    return sum(late) / len(late) - sum(early) / len(early)
