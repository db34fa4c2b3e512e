"""What the scheduler tells a worker, and what a worker reports back (pure types).

A worker's stream carries, in order, a :class:`Welcome`, then :class:`StepPlan` s (each a
list of commands and at most one model step), :class:`AbortJobs` (the one way a job is
aborted on a worker: at its next step boundary, ahead of the plans it holds) and, last, a
:class:`Shutdown`; the worker answers every plan with a :class:`StepReport`. The services
convert these to and from protobuf in one place (``alise.common.wire``); nothing inward sees
protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from alise.core.job import FinishReason
from alise.core.sampling import SamplingParams


class KvAction(enum.Enum):
    KEEP = "keep"
    QUANTIZE_INT8 = "int8"
    QUANTIZE_INT4 = "int4"
    SWAP_TO_HOST = "swap"
    DROP = "drop"


@dataclass(frozen=True)
class Admit:
    job_id: str
    token_ids: list[int]
    sampling: SamplingParams
    #: How many of the trailing ``token_ids`` were already generated (a moved job).
    num_generated: int = 0
    #: Leading tokens the worker's prefix cache holds, as the scheduler's mirror found them
    #: (whole blocks, ``alise.core.prefix_mirror``): the job starts after them.
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class Pause:
    job_id: str
    action: KvAction
    #: With DROP: tokens whose values the scheduler knew when it planned the drop (prompt and
    #: outputs reported, ``alise.core.prefix_mirror.known_tokens``); the worker caches the full
    #: blocks of as many of them as it computed (``reusable_tokens``). 0: its admitted tokens.
    num_reusable_tokens: int = 0


@dataclass(frozen=True)
class Resume:
    job_id: str
    #: Of a dropped job: leading tokens the worker's prefix cache holds, as the scheduler's
    #: mirror found them (whole blocks): taken as an admit takes them, not recomputed.
    num_cached_tokens: int = 0


Command = Admit | Pause | Resume


@dataclass
class StepPlan:
    """One step of one worker: apply ``commands`` in order, then (``run_step``) one model step.

    The step feeds every running job of the worker whose next token is ready to decode one
    token (``num_uncomputed == 1``: implicit, so a decode-only step's plan lists no job), and
    each job of ``chunks`` the number of prompt / recompute tokens given there. A running
    job with more than one uncomputed token that ``chunks`` leaves out sits the step out.
    """

    step_id: int
    commands: list[Command] = field(default_factory=list)
    run_step: bool = False
    #: job id -> tokens it feeds this step, for jobs with more than one uncomputed token.
    chunks: dict[str, int] = field(default_factory=dict)
    #: The report lists every job the worker holds after the step (``alise.core.census``).
    census: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.commands and not self.run_step and not self.census


@dataclass(frozen=True)
class Welcome:
    """The first message on a worker's stream: an empty plan of step 0, whose report confirms
    the worker is running plans, and the scheduler's id (random at its start)."""

    scheduler_id: str


@dataclass(frozen=True)
class AbortJobs:
    """Abort these jobs at the next step boundary, ahead of any plan the worker holds.

    It rides the stream that carries the plans, so it always comes after the plan that
    admitted its jobs. ``through_step_id`` is the last plan sent before it: a plan up to that
    one which the worker has not run yet may admit one of the jobs (its client left
    meanwhile); the worker skips that admit (``alise.core.census`` relies on it)."""

    job_ids: tuple[str, ...]
    through_step_id: int


@dataclass(frozen=True)
class Shutdown:
    """The scheduler closes the stream; the worker drops its jobs and reconnects."""

    reason: str


#: What a scheduler sends down a worker's stream.
ToWorker = Welcome | StepPlan | AbortJobs | Shutdown


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and its step's most likely tokens (vLLM's raw
    logprobs: the log-softmax of the model's logits, before adjustments and temperature).
    ``top_ids`` / ``top_logprobs``: the ``SamplingParams.logprobs`` most likely tokens, most
    likely first (ties in id order as ``torch.topk`` gives them); empty with ``logprobs=0``."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class JobOutput:
    job_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_tokens: int
    #: One per token of ``token_ids`` where the job's params ask for logprobs, else None.
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class Refusal:
    job_id: str
    command: str
    reason: str


@dataclass
class StepReport:
    """What a worker did with one plan: the tokens sampled (one per job whose feed reached the
    end of its sequence), the commands it refused, the step's shape and time."""

    step_id: int
    outputs: list[JobOutput] = field(default_factory=list)
    step_duration_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_free_device_blocks: int = 0
    refused: list[Refusal] = field(default_factory=list)
    #: Sequences in the step and their context (cached + fed tokens), as the latency model
    #: prices a step; ``chunks`` the (start position, tokens) of each multi-token feed.
    num_seqs: int = 0
    num_context_tokens: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)
    #: With a census plan: every job the worker holds after the step, running or paused.
    census_job_ids: list[str] = field(default_factory=list)
    #: Tokens of the plan's admits, and of its resumes, that the plan counted cached and the
    #: worker's prefix cache lacked: it computes them (stand-ins, ``alise.worker.kv_manager``).
    num_admit_stand_in_tokens: int = 0
    num_resume_stand_in_tokens: int = 0


@dataclass(frozen=True)
class HeldJob:
    """A job a worker kept, paused, while it had no scheduler (its hello lists them)."""

    job_id: str
    token_ids: list[int]
    num_generated: int
    sampling: SamplingParams
    #: Positions whose K/V the worker holds on the device (0: none).
    num_computed: int


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for a client stream; ``index`` is the position of ``token_ids[0]``."""

    job_id: str
    token_ids: list[int]
    index: int
    finish_reason: FinishReason | None
    #: One per token of ``token_ids`` where the job asked for logprobs and the scheduler saw
    #: them; None otherwise (tokens a resumed stream catches up on carry none).
    logprobs: list[TokenLogprobs] | None = None
