"""Discrete-event simulation of a cluster: the real scheduler core, virtual workers, virtual time.

The simulator replays a trace against the same ``SchedulerCore`` (policy, ordering,
selection, memory planning, block accounting) that the scheduler service runs, and against
``VirtualWorker``s that carry out its plans with the real ``BlockAllocator``. Only time is
virtual: a step lasts what the ``LatencyModel`` says, and the core plans a worker's next
step at the moment its previous one ends, exactly as the engine loop does on a report.

Events are arrivals and step ends. A job's latency is measured from its arrival to the end
of the step that produced its last token; normalized latency is that over its output tokens.
Every result is labelled "simulated" with the profile's name.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from alise.core.blocks import WorkerCapacity
from alise.core.commands import StepReport
from alise.core.job import Job, LengthEstimate
from alise.core.latency_model import LatencyModel
from alise.core.policy import Policy
from alise.core.sampling import SamplingParams
from alise.core.scheduler import SchedulerCore
from alise.sim.trace import TraceRequest
from alise.sim.virtual_worker import VirtualWorker


@dataclass(frozen=True)
class SimConfig:
    """One simulated worker's shape (every worker alike) and the cluster size."""

    #: KV room in tokens per worker (default: OPT-13B on an H100, the issue's reference).
    kv_tokens: int = 15_000
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    num_workers: int = 1
    #: max_tokens of every request: a generous cap, not the true length (which the policy
    #: must not see); each job carries its trace length as ``oracle_output_tokens``
    #: and ends there (``Job.worker_sampling``), as on the real path.
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("kv_tokens", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "num_workers", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_device_blocks(self) -> int:
        return self.kv_tokens // self.block_size

    def capacity(self, worker_id: str) -> WorkerCapacity:
        return WorkerCapacity(worker_id, self.block_size, self.num_device_blocks, 0,
                              self.max_model_len, self.max_num_seqs, self.max_num_batched_tokens)


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


def simulate(requests: Sequence[TraceRequest], policy: Policy, latency: LatencyModel,
             config: SimConfig = SimConfig(), *,
             estimates: Mapping[int, LengthEstimate] | None = None,
             max_steps: int = 5_000_000) -> SimResult:
    """Replays ``requests`` (in arrival order) through the core; ``estimates`` by request index."""
    started = time.perf_counter()
    core = SchedulerCore(policy)
    workers: dict[str, VirtualWorker] = {}
    for w in range(config.num_workers):
        wid = f"w{w}"
        core.add_worker(config.capacity(wid))
        workers[wid] = VirtualWorker(num_device_blocks=config.num_device_blocks,
                                     block_size=config.block_size,
                                     max_model_len=config.max_model_len, latency=latency)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    jobs: dict[str, Job] = {}
    sampling = SamplingParams(max_tokens=config.max_tokens, ignore_eos=True)
    busy: list[tuple[float, str]] = []          # (step end, worker id)
    in_flight: dict[str, tuple] = {}             # worker id -> (plan, report)
    idle = set(workers)
    next_arrival = 0
    num_steps = 0
    now = 0.0
    max_len = min(config.max_model_len, config.num_device_blocks * config.block_size)
    meter = WorkMeter({f"r{i}": (r.prompt_tokens, output_target(r.prompt_tokens, r.output_tokens,
                                                                config.max_tokens, max_len))
                       for i, r in enumerate(requests)})
    backlog: list[tuple[float, float]] = []
    while next_arrival < len(order) or core.jobs:
        if num_steps > max_steps:
            raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        t_arrival = requests[order[next_arrival]].arrival_s if next_arrival < len(order) else None
        t_step = busy[0][0] if busy else None
        if t_step is not None and (t_arrival is None or t_step <= t_arrival):
            now, wid = heapq.heappop(busy)
            plan, report = in_flight.pop(wid)
            core.apply_report(wid, report, now)
            idle.add(wid)
        elif t_arrival is not None:
            now = t_arrival
            while next_arrival < len(order) and requests[order[next_arrival]].arrival_s <= now:
                i = order[next_arrival]
                r = requests[i]
                job_id = f"r{i}"
                job = Job(job_id, [1] * r.prompt_tokens, sampling, arrival_s=r.arrival_s,
                          estimate=estimates.get(i) if estimates else None,
                          oracle_output_tokens=r.output_tokens)
                jobs[job_id] = job
                core.submit(job)
                next_arrival += 1
            left = meter.left(core.jobs.values())
            backlog.extend([left] * (next_arrival - len(backlog)))
        else:
            raise RuntimeError("simulation stalled: jobs left but no worker can run them")
        for wid in sorted(idle):
            for _ in range(4):  # a plan of commands only (aborts) is answered at once
                plan = core.schedule(wid, now)
                if plan.is_empty:
                    break
                worker = workers[wid]
                refused = worker.apply(plan.commands)
                if plan.run_step:
                    report = worker.step(plan.step_id)
                    report.refused = refused
                    in_flight[wid] = (plan, report)
                    heapq.heappush(busy, (now + report.step_duration_s, wid))
                    idle.discard(wid)
                    num_steps += 1
                    break
                core.apply_report(wid, StepReport(
                    plan.step_id, refused=refused,
                    num_free_device_blocks=worker.allocator.num_free), now)
        if not busy and next_arrival >= len(order) and core.jobs:
            raise RuntimeError(f"simulation stalled with {len(core.jobs)} jobs that fit no worker")
    records = []
    for job_id, job in jobs.items():
        records.append(JobRecord(job_id, job.num_prompt_tokens, job.num_output_tokens,
                                 job.arrival_s, job.first_token_s or job.finish_s or 0.0,
                                 job.finish_s or 0.0, job.num_preemptions))
    return SimResult(policy.name, latency.name, records, now, num_steps, Counter(core.preemptions),
                     time.perf_counter() - started, work_backlog=[b[0] for b in backlog],
                     kv_backlog=[b[1] for b in backlog])


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
