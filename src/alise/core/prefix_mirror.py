"""The scheduler core's mirror of one worker's prefix cache: what is cached there, exactly.

Where the truth lives: the worker's allocator holds the blocks (ids, bytes); the scheduler
must know, when it plans an admit, how many of the job's tokens are cached there, since that
sets the job's prefill (its chunks, its step's token budget, its remaining time) and its
blocks. A report of hits would come back after the plan it should have shaped. So the core
keeps a mirror: the same :class:`~alise.core.prefix_cache.PrefixCache` class, with ids of its
own, fed the operations the worker performs in the order the worker performs them (plans
are applied in order: admits with their hits, the blocks each planned step grows, the KV
moves of pauses and resumes, releases), with the same chain hashes of the same token ids. So
it evicts what the worker evicts, and a plan's hit is one the worker can honour.

The core decides every hit (``admit``) and the admit carries it (``Admit.num_cached_tokens``):
the worker takes exactly that prefix, never a longer one, so both sides hold the same
references. The two can drift apart only where the worker acts before the core hears of it:
a job that finishes early or is aborted is released on the worker one or two steps before the
core releases it here, which can change the LRU order under pressure. The worker then lacks a
prefix the core counted on: it takes what it has and computes the rest in the job's next feed
(``alise.worker.kv_manager``: stand-in blocks), so the job holds the blocks and has computed
the tokens the core counts, and only that step runs longer than planned; the step's report
says how many tokens it computed so, which ``PrefillCounts`` then counts computed, not cached
(``SchedulerCore.apply_report``: the one place). Only where it has no
room for the rest does it refuse the admit or resume: the job is re-queued and the mirror
``forget`` s that prefix, so a plan never counts on work that was not done.

Accounting (``SchedulerCore``): a job's ``num_shared_tokens`` are its leading tokens read
from shared cached blocks; a worker's device blocks in use are ``num_shared_in_use`` (each
shared block once) plus every job's private blocks, counted by the usual formulas
(``alise.core.blocks``) over ``Job.num_private_tokens``. Cached free blocks count as free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alise.core.job import Job
from alise.core.prefix_cache import BlockHash, PrefixCache, chain_hashes, reusable_tokens

logger = logging.getLogger(__name__)


def known_tokens(job: Job) -> int:
    """Tokens whose values the scheduler knows: the prompt and the outputs reported. A drop
    caches the full blocks of as many of them as were computed (``Pause.num_reusable_tokens``)."""
    return job.num_prompt_tokens + job.num_output_tokens


class HashMemo:
    """Chain hashes of each unfinished job's tokens, computed once per block size and length."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[int, int, list[BlockHash]]] = {}

    def of(self, job: Job, block_size: int) -> list[BlockHash]:
        """Hashes of the full blocks of ``job.all_token_ids()`` (what an admit would carry)."""
        n = job.num_prompt_tokens + job.num_output_tokens
        memo = self._memo.get(job.job_id)
        if memo is None or memo[0] != block_size or memo[1] != n:
            memo = (block_size, n, chain_hashes(job.all_token_ids(), block_size))
            self._memo[job.job_id] = memo
        return memo[2]

    def drop(self, job_id: str) -> None:
        self._memo.pop(job_id, None)


@dataclass
class PrefillCounts:
    """Tokens the admits of a core gave its workers, those found cached, and those computed."""

    #: Tokens of every admit (prompt, and earlier output of a re-queued job).
    num_admitted_tokens: int = 0
    #: Of them, tokens read from the prefix cache.
    num_cached_tokens: int = 0
    #: Tokens a prefill computes: admitted less cached, plus recomputes after a drop.
    num_computed_tokens: int = 0
    #: Tokens the drops left in the prefix cache, and of them those still there at the resumes
    #: (the rest were evicted meanwhile and are recomputed).
    num_drop_cached_tokens: int = 0
    num_resume_cached_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_admitted_tokens if self.num_admitted_tokens else 0.0

    def count_stand_ins(self, num_admit_tokens: int, num_resume_tokens: int) -> None:
        """A worker lacked that many tokens of the prefixes its admits and resumes were planned
        to find cached, and computed them (``StepReport.num_admit_stand_in_tokens``)."""
        self.num_cached_tokens -= num_admit_tokens
        self.num_resume_cached_tokens -= num_resume_tokens
        self.num_computed_tokens += num_admit_tokens + num_resume_tokens


class PrefixMirror:
    """The core's copy of one worker's :class:`PrefixCache` and of each job's block table."""

    def __init__(self, num_blocks: int, block_size: int, memo: HashMemo) -> None:
        self.cache = PrefixCache(num_blocks)
        self.block_size = block_size
        self.memo = memo
        self._tables: dict[str, list[int]] = {}
        self._admitted: dict[str, int] = {}

    def _hit_hashes(self, job: Job) -> list[BlockHash]:
        """The job's hashes a hit may cover: at least one token is left to compute (its logits)."""
        hashes = self.memo.of(job, self.block_size)
        return hashes[:(job.num_tokens - 1) // self.block_size]

    def lookup(self, job: Job) -> tuple[int, int]:
        """(tokens of the job's prefix cached here, cached blocks of it that no job reads: an
        admit takes them out of the free blocks)."""
        matched, in_use = self.cache.num_matched_in_use(self._hit_hashes(job))
        return matched * self.block_size, matched - in_use

    def admit(self, job: Job, max_cached_tokens: int) -> int:
        """The job starts here: takes its cached prefix (at most ``max_cached_tokens``, what its
        plan counted on) and returns its length in tokens."""
        self._admitted[job.job_id] = known_tokens(job)
        return self.resume(job, max_cached_tokens)

    def resume(self, job: Job, max_cached_tokens: int) -> int:
        """A job with no blocks here (admitted, or dropped and resumed) takes its cached prefix,
        at most ``max_cached_tokens``, and returns its length in tokens."""
        hashes = self._hit_hashes(job)[:max_cached_tokens // self.block_size]
        ids = self.cache.match(hashes)
        self.cache.acquire(ids)
        self._tables[job.job_id] = ids
        return len(ids) * self.block_size

    def adopt(self, job: Job, num_blocks: int) -> None:
        """A job the worker kept without a scheduler: its blocks, all private here."""
        self._tables[job.job_id] = []
        self._admitted[job.job_id] = known_tokens(job)
        self.resize(job, num_blocks)

    def resize(self, job: Job, num_blocks: int) -> None:
        """The job holds ``num_blocks`` device blocks, its shared prefix included (a step grew
        it, a pause moved its private blocks, a resume brought them back)."""
        table = self._tables.setdefault(job.job_id, [])
        shared = job.num_shared_tokens // self.block_size
        num_blocks = max(num_blocks, shared)
        if num_blocks < len(table):
            self.cache.release(table[num_blocks:])
            del table[num_blocks:]
        elif num_blocks > len(table):
            ids = self.cache.allocate(num_blocks - len(table))
            if ids is None:
                # The core's block accounting rules this out; keep going with what is free.
                logger.error("prefix mirror: %d blocks for job %s, %d free", num_blocks - len(table),
                             job.job_id, self.cache.num_free)
                ids = self.cache.allocate(self.cache.num_free) or []
            table += ids

    def release(self, job: Job, *, finished: bool, on_device: bool, leaves: bool = True) -> None:
        """The job leaves the worker (``leaves``) or drops its KV there: its full blocks
        (``reusable_tokens``) are cached when its KV was at full precision on the device, then
        every reference goes. A drop caches those of its known tokens (``known_tokens``, the
        count its ``Pause`` carries) that were computed; a job that leaves, those of its
        admitted tokens. A job that stays keeps the count of its admitted tokens (the worker's
        sequence does), for its next release."""
        table = self._tables.pop(job.job_id, None)
        admitted = self._admitted.pop(job.job_id, 0) if leaves else self._admitted.get(job.job_id, 0)
        if table is None:
            return
        if on_device:
            tokens = job.all_token_ids()
            computed = len(tokens) - 1 if finished else job.num_computed_tokens
            known = admitted if leaves else max(admitted, known_tokens(job))
            n = min(reusable_tokens(computed, known, finished) // self.block_size, len(table))
            self.cache.register(table[:n], chain_hashes(tokens, self.block_size, n))
        self.cache.release(table)

    def forget(self, job: Job) -> None:
        """The worker lacked a prefix this mirror found: nothing of it is counted on again."""
        self.cache.forget(self.memo.of(job, self.block_size))

    @property
    def num_shared_in_use(self) -> int:
        return self.cache.num_shared_in_use
