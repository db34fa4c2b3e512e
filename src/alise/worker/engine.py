"""The worker's engine: continuous batching over the paged KV cache, one plan at a time.

Mechanism only. The scheduler decides who runs; the engine carries out its commands (admit,
pause with a KV action, resume, abort) and runs one model step per plan over its running
sequences: each one whose next token is ready decodes it, and each one the plan lists in
``chunks`` feeds that many of its uncomputed tokens (chunked prefill). Sequences join and
leave at step boundaries. No torch here: the forward pass and sampling are an
:class:`Executor`'s (``alise.worker.model.executor.ModelExecutor`` on a real worker, the latency
model's in the simulator, which runs this very engine), the KV bytes a ``KvMover``'s.

Aborts are not commands of a plan: they come at once (``abort``, from an ``AbortJobs`` on the
stream) and are applied at the next step boundary, ahead of the plans the worker already
holds. Each names the last plan sent before it (``through``): a plan up to that one may still
admit the job (the scheduler admitted it, then its client left), so the engine remembers the
id until that plan has run and skips the admit. Without that, a job cancelled while its admit
was in flight would run to its end on a worker whose scheduler no longer knows it.

Prefix caching (``KvManager.start``): an admit may name leading tokens the worker's prefix
cache holds; the sequence starts with those blocks as computed and feeds only the rest. Where
the cache lacks some of them (``Sequence.num_missing``), its next feed starts that much earlier
and is that much longer, so it ends where the plan's chunk does; the plan's report counts those
tokens (stand-ins), which the scheduler counted cached.

Overlapped steps (``launch`` then ``finish``, ``alise worker --async-steps``): ``run`` split so
that the next plan's step is launched before this one's tokens are on the host. A sequence that
sampled in the step in flight decodes that token (its id gathered on the device, ``Feed.
source_row``) unless the host already knows the token ends it (its length); one that stops on
the token has its next one dropped at ``finish``. The reports are ``run``'s.

Token arithmetic (mirrored by ``alise.core.job``): a sequence of ``n`` tokens whose first ``c``
positions are cached feeds tokens ``[c, c + k)`` in a step and needs ``ceil((c + k) / block_size)``
blocks for it; when ``c + k = n`` the step samples one token, which is appended (not cached).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from alise.core.blocks import blocks_for
from alise.core.commands import Admit, Command, HeldJob, JobOutput, Pause, Refusal, StepPlan, StepReport, TokenLogprobs
from alise.core.job import FinishReason, KvPlace
from alise.core.sampling import SamplingParams
from alise.worker.kv_manager import KvManager, KvState

logger = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class Sequence(KvState):
    """One job on this worker: its tokens (prompt and output) and where its KV is."""

    job_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_generated: int = 0
    generator: object | None = None
    paused: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Feed:
    """One sequence's part of a step: ``num_tokens`` tokens from position ``start``."""

    seq: Sequence
    start: int
    num_tokens: int
    #: An overlapped step's decode whose one token the step before sampled and has not handed
    #: to the host yet: the row of that step's sampled ids holding it (None: the token is in
    #: ``seq.token_ids``).
    source_row: int | None = None

    @property
    def token_ids(self) -> list[int]:
        if self.source_row is not None:
            return [0]  # a placeholder: the executor takes the id on the device
        return self.seq.token_ids[self.start:self.start + self.num_tokens]

    @property
    def samples(self) -> bool:
        """The feed reaches the end of the sequence: the step samples its next token."""
        return self.source_row is not None or self.start + self.num_tokens == self.seq.num_tokens


class Executor(Protocol):
    vocab_size: int

    def make_generator(self, seed: int) -> object:
        """A random stream for a seeded request."""

    def release(self, job_id: str) -> None:
        """The job left this worker (an executor may hold per-sequence state)."""

    def execute(self, feeds: list[Feed]) -> tuple[list[int], float, list[TokenLogprobs | None] | None]:
        """Runs one step over ``feeds`` (their K/V written to the sequences' blocks); returns
        the token sampled for each feed that ``samples``, in order, the step's seconds, and
        each sampled token's logprobs where its params ask (None: none asks)."""

    # Overlapped steps (``WorkerEngine.launch``), where ``can_overlap`` is true:
    # ``launch(feeds, previous_handle) -> handle``, ``done(handle) -> bool`` (the device has
    # finished it) and ``collect(handle) -> (tokens, seconds, logprobs)``.


@dataclass(eq=False)
class LaunchedStep:
    """A step on the device whose sampled tokens the host has not read yet (``launch``)."""

    plan: StepPlan
    report: StepReport
    #: The feeds that sample, in the order of the step's sampled ids.
    sampled: list[Feed]
    #: The executor's handle on the step (None: nothing ran).
    handle: object | None = None
    shape: tuple[int, int, list[int], list[int]] | None = None


class WorkerEngine:
    def __init__(self, executor: Executor, kv: KvManager, *, eos_token_id: int | None,
                 max_model_len: int) -> None:
        self.executor = executor
        self.kv = kv
        self.eos_token_id = eos_token_id
        self.block_size = kv.block_size
        # No sequence may outgrow the whole cache: it ends there (LENGTH) instead of
        # waiting forever for blocks that cannot exist.
        self.max_model_len = min(max_model_len, kv.allocator.num_blocks * kv.block_size)
        self.seqs: dict[str, Sequence] = {}
        #: Aborted before their admit ran: job id -> the last plan that may still admit it.
        self.aborted: dict[str, int] = {}
        #: Step id of the last plan run (-1: none since ``new_session``).
        self.last_step_id = -1
        #: The last step's shape as ``LatencyModel.fit`` takes it: (sequences, context tokens,
        #: chunk lengths, chunk starts); None before the first step.
        self.last_step_shape: tuple[int, int, list[int], list[int]] | None = None
        #: Overlapped steps: sequences refused by a launch while the step before it still held
        #: their token (job id -> the sequence, the launch's report, its refusal); ``finish``
        #: of that step reports the token first, as the synchronous engine did.
        self._handed_back: dict[str, tuple[Sequence, StepReport, Refusal]] = {}

    @property
    def allocator(self):
        return self.kv.allocator

    # ----------------------------------------------------------------- commands

    def apply(self, commands: list[Command]) -> list[Refusal]:
        refused = []
        for command in commands:
            reason = self._apply_one(command)
            if reason is not None:
                name = type(command).__name__.lower()
                refused.append(Refusal(command.job_id, name, reason))
                logger.warning("refused %s of %s: %s", name, command.job_id, reason)
        return refused

    def _apply_one(self, command: Command) -> str | None:
        if isinstance(command, Admit):
            return self._admit(command)
        seq = self.seqs.get(command.job_id)
        if seq is None:
            # Finished or aborted here since the plan was made: nothing left to do.
            return None
        if isinstance(command, Pause):
            seq.paused = True  # the pause always happens; a refused KV move leaves the KV as it was
            return self.kv.pause(seq, command.action, command.num_reusable_tokens)
        reason = self.kv.resume(seq, command.num_cached_tokens)
        seq.paused = reason is not None
        return reason

    def _admit(self, command: Admit) -> str | None:
        if command.job_id in self.aborted:
            logger.debug("admit of %s skipped: aborted before its plan ran", command.job_id)
            return None
        if command.job_id in self.seqs:
            return f"job {command.job_id} is already on this worker"
        if not command.token_ids:
            return "empty prompt"
        if len(command.token_ids) >= self.max_model_len:
            return f"{len(command.token_ids)} tokens do not fit the context of {self.max_model_len}"
        vocab = self.executor.vocab_size
        if min(command.token_ids) < 0 or max(command.token_ids) >= vocab:
            return f"token ids must be in [0, {vocab})"
        if any(t >= vocab for t, _ in command.sampling.logit_bias):  # a device-side index
            return f"logit_bias token ids must be in [0, {vocab})"
        generator = None
        if command.sampling.seed is not None:
            generator = self.executor.make_generator(command.sampling.seed)
        seq = Sequence(job_id=command.job_id, token_ids=list(command.token_ids), sampling=command.sampling,
                       num_generated=command.num_generated, generator=generator)
        reason = self.kv.start(seq, command.num_cached_tokens)
        if reason is None:
            self.seqs[command.job_id] = seq
        return reason

    def abort(self, job_ids: Iterable[str], through: int = -1) -> None:
        """Aborts at the step boundary, ahead of the plans held: a job here is released; one not
        here yet is remembered until plan ``through`` (the last sent before the abort) has run."""
        for job_id in job_ids:
            seq = self.seqs.get(job_id)
            if seq is not None:
                self._release(seq)
            elif through > self.last_step_id:
                self.aborted[job_id] = through

    def new_session(self) -> None:
        """A new scheduler stream: step ids start again, and no plan of the last one runs."""
        self.aborted.clear()
        self.last_step_id = -1

    def _release(self, seq: Sequence, *, finished: bool = False) -> None:
        self.kv.release(seq, finished=finished)
        self.executor.release(seq.job_id)
        del self.seqs[seq.job_id]

    def abort_all(self) -> None:
        for seq in list(self.seqs.values()):
            self._release(seq)

    def hold(self) -> list[HeldJob]:
        """The scheduler is gone: every job pauses where it is, keeping its tokens and its KV
        if that is in full precision on the device (other places are dropped: a scheduler that
        adopts the job recomputes them). Returns the jobs, for the next hello."""
        held = []
        for seq in self.seqs.values():
            seq.paused = True
            if seq.place is not KvPlace.DEVICE:
                self.kv.release(seq)
            held.append(HeldJob(seq.job_id, list(seq.token_ids), seq.num_generated, seq.sampling,
                                seq.num_cached))
        return held

    # ----------------------------------------------------------------- stepping

    def run(self, plan: StepPlan) -> StepReport:
        """Applies the plan's commands and runs its step (blocking: call off the event loop)."""
        missing = self._missing_tokens()
        refused = self.apply(plan.commands)
        report = self.step(plan) if plan.run_step else StepReport(step_id=plan.step_id)
        report.refused = refused + report.refused
        self._count_stand_ins(report, missing)
        self._ran(plan.step_id)
        return self._seal(plan, report)

    def _ran(self, step_id: int) -> None:
        """Plan ``step_id``'s commands have been applied: aborts waiting for it are done."""
        self.last_step_id = step_id
        if self.aborted:
            self.aborted = {job_id: t for job_id, t in self.aborted.items() if t > step_id}

    def _missing_tokens(self) -> tuple[int, int]:
        return self.kv.num_admit_missing_tokens, self.kv.num_resume_missing_tokens

    def _count_stand_ins(self, report: StepReport, before: tuple[int, int]) -> None:
        """The stand-in tokens the plan's admits and resumes took since ``before``
        (``_missing_tokens`` ahead of its commands) into its report."""
        admits, resumes = self._missing_tokens()
        report.num_admit_stand_in_tokens = admits - before[0]
        report.num_resume_stand_in_tokens = resumes - before[1]

    def _seal(self, plan: StepPlan, report: StepReport) -> StepReport:
        report.num_free_device_blocks = self.kv.num_free_device
        if plan.census:
            report.census_job_ids = list(self.seqs)
        return report

    # ----------------------------------------------------------------- overlapped steps

    def can_overlap(self, previous: LaunchedStep, plan: StepPlan) -> bool:
        """Whether ``plan`` may be launched before ``previous``'s tokens are read: not after a
        census (its report counts what is left right after it), nor when the plan pauses a job
        whose token is in flight (whether that token ends the job decides the KV action)."""
        if previous.plan.census:
            return False
        in_flight = {f.seq.job_id for f in previous.sampled}
        return not any(isinstance(c, Pause) and c.job_id in in_flight for c in plan.commands)

    def launch(self, plan: StepPlan, previous: LaunchedStep | None = None) -> LaunchedStep:
        """``run`` split in two: applies the plan's commands and queues its step on the device
        (``executor.launch``); ``finish`` reads its tokens and makes its report. ``previous``:
        the step launched before and not finished yet (``can_overlap`` said yes); a sequence
        that samples there decodes that token here, its id taken on the device. The reports
        are the synchronous ones: a sequence that ends with ``previous``'s token is not fed
        when the host knows it (its length), else its token from this step is dropped."""
        missing = self._missing_tokens()
        refused = self.apply(plan.commands)
        report = StepReport(step_id=plan.step_id)
        self._count_stand_ins(report, missing)
        launched = LaunchedStep(plan, report, [])
        if plan.run_step:
            pending = self._pending(previous) if previous is not None else None
            feeds = self._feeds(plan, report, pending)
            if feeds:
                self.kv.wait_ready([f.seq for f in feeds])
                launched.handle = self.executor.launch(feeds, previous.handle if pending else None)
                launched.shape = self._count(report, feeds)
                launched.sampled = [f for f in feeds if f.samples]
                self._computed(feeds)
        report.refused = refused + report.refused
        self._ran(plan.step_id)
        return launched

    def step_done(self, launched: LaunchedStep) -> bool:
        """Whether the device has finished a launched step (``finish`` would not wait)."""
        return launched.handle is None or self.executor.done(launched.handle)

    def finish(self, launched: LaunchedStep) -> StepReport:
        """Waits for a launched step's tokens; its report (``run``'s)."""
        report = launched.report
        if launched.handle is not None:
            tokens, report.step_duration_s, logprobs = self.executor.collect(launched.handle)
            self.last_step_shape = launched.shape
            self._take(report, launched.sampled, tokens, logprobs)
        return self._seal(launched.plan, report)

    def _pending(self, previous: LaunchedStep) -> dict[str, int | None]:
        """The sequences whose token ``previous`` sampled: their row of its sampled ids, None
        where the token ends the sequence by length (``_append``'s rule, one token ahead)."""
        pending = {}
        for row, feed in enumerate(previous.sampled):
            seq = feed.seq
            if self.seqs.get(seq.job_id) is seq:
                ends = (seq.num_generated + 1 >= seq.sampling.max_tokens
                        or seq.num_tokens + 1 >= self.max_model_len)
                pending[seq.job_id] = None if ends else row
        return pending

    def step(self, plan: StepPlan) -> StepReport:
        """One model step over the running sequences (see the module doc)."""
        report = StepReport(step_id=plan.step_id)
        feeds = self._feeds(plan, report)
        if not feeds:
            return report
        self.kv.wait_ready([f.seq for f in feeds])  # swapped-in jobs run once their blocks are back
        tokens, report.step_duration_s, logprobs = self.executor.execute(feeds)
        self.last_step_shape = self._count(report, feeds)
        sampled = [f for f in feeds if f.samples]
        self._computed(feeds)
        self._take(report, sampled, tokens, logprobs)
        return report

    def _computed(self, feeds: list[Feed]) -> None:
        """The feeds' K/V is written (or queued ahead of any later step)."""
        for feed in feeds:
            feed.seq.num_cached = feed.start + feed.num_tokens
            if feed.seq.num_missing:
                self.kv.fill(feed.seq)

    @staticmethod
    def _count(report: StepReport, feeds: list[Feed]) -> tuple[int, int, list[int], list[int]]:
        """The step's figures into ``report``; returns its shape (``last_step_shape``)."""
        lens = [f.num_tokens for f in feeds if f.num_tokens > 1]
        starts = [f.start for f in feeds if f.num_tokens > 1]
        report.num_seqs = len(feeds)
        report.num_context_tokens = sum(f.start + f.num_tokens for f in feeds)
        report.chunks = list(zip(starts, lens, strict=True))
        report.num_prefill_tokens = sum(lens)
        report.num_decode_tokens = len(feeds) - len(lens)
        return report.num_seqs, report.num_context_tokens, lens, starts

    def _take(self, report: StepReport, sampled: list[Feed], tokens: list[int],
              logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """Appends each sampled token (with its logprobs, where its params ask) to its
        sequence. A sequence gone since the step was launched (it finished at the step before,
        whose tokens were still on the device) has its token dropped: the synchronous engine
        would not have fed it."""
        for i, (feed, token) in enumerate(zip(sampled, tokens, strict=True)):
            seq = feed.seq
            token_logprobs = logprobs[i] if logprobs is not None else None
            if self.seqs.get(seq.job_id) is seq:
                report.outputs.append(self._append(seq, token, token_logprobs))
            elif (held := self._handed_back.pop(seq.job_id, None)) is not None and held[0] is seq:
                # Refused by the step launched behind this one: its token comes first, and a
                # token that ends it means the synchronous engine never fed it again to refuse.
                output = self._append(seq, token, token_logprobs, release=False)
                report.outputs.append(output)
                if output.finish_reason is not None:
                    held[1].refused.remove(held[2])

    def _feeds(self, plan: StepPlan, report: StepReport, pending: dict[str, int | None] | None = None) -> list[Feed]:
        """Each running sequence's feed, with its blocks grown to cover it. ``pending``: the
        sequences whose next token the step before has sampled but the host has not read, each
        with its row of that step's sampled ids (None: the token ends the sequence by length,
        so it is not fed)."""
        pending = pending or {}
        feeds = []
        for job_id, seq in list(self.seqs.items()):
            if seq.paused:
                continue
            row = pending.get(job_id, -1)
            if row is None:
                continue
            left = seq.num_tokens - seq.num_cached + (row >= 0)
            n = 1 if left == 1 else plan.chunks.get(job_id, 0)
            if not n:
                continue
            if n > left:
                self._refuse(report, seq, "chunk", f"{n} tokens to feed, {left} uncomputed")
                continue
            missing = blocks_for(seq.num_cached + n, self.block_size) - len(seq.block_table)
            if missing > 0:
                ids = self.kv.allocate(missing)
                if ids is None:
                    # The scheduler's accounting prevents this; hand the job back rather
                    # than run it without room for its K/V.
                    self._refuse(report, seq, "step", f"no free block ({missing} missing)")
                    if row >= 0:
                        self._handed_back[job_id] = (seq, report, report.refused[-1])
                    continue
                seq.block_table.extend(ids)
            # A sequence never fed since its prefix was taken has no token in flight (row < 0).
            feeds.append(Feed(seq, seq.num_cached - seq.num_missing, n + seq.num_missing, row if row >= 0 else None))
        return feeds

    def _refuse(self, report: StepReport, seq: Sequence, what: str, reason: str) -> None:
        logger.error("job %s left out of step %d: %s", seq.job_id, report.step_id, reason)
        report.refused.append(Refusal(seq.job_id, what, reason))
        self._release(seq)

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None, *,
                release: bool = True) -> JobOutput:
        can_stop = seq.sampling.can_stop(seq.num_generated)  # the sampler's min_tokens rule
        seq.token_ids.append(token)
        seq.num_generated += 1
        reason = None
        if can_stop and (token in seq.sampling.stop_token_ids or (
                not seq.sampling.ignore_eos and token == self.eos_token_id)):
            reason = FinishReason.STOP
        elif seq.num_generated >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        output = JobOutput(seq.job_id, [token], reason, seq.num_tokens,
                           [logprobs] if logprobs is not None else None)
        if reason is not None and release:
            self._release(seq, finished=True)
        return output

    # Read by metrics scrapes from another thread while the step thread changes ``seqs``: the
    # values are copied first (one C call, under the GIL), so a step's admit or release cannot
    # resize the dict under the count.
    @property
    def num_running(self) -> int:
        return sum(1 for s in list(self.seqs.values()) if not s.paused)

    @property
    def num_paused(self) -> int:
        return sum(1 for s in list(self.seqs.values()) if s.paused)
