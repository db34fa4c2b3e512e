"""Plain result types of the SDK (no protobuf in the caller's hands)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Chunk", "Completion", "Conversation", "Estimate", "Status", "TokenLogprobs", "Usage"]


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the most likely tokens of its step (vLLM's raw
    logprobs: the log-softmax of the model's logits, before penalties and temperature).
    ``top_ids`` / ``top_logprobs``: the request's ``logprobs`` most likely tokens, most likely
    first; empty with ``logprobs=0``."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """The conversation a prompt continues, for the scheduler's output-length estimate only
    (the model reads the prompt alone): ``query``, the request's own text where the prompt
    renders it after a system prompt or earlier turns (the latest user message); and the
    output tokens of the earlier answers, oldest first, in the served model's tokens."""

    query: str = ""
    previous_output_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    e2e_s: float
    queued_s: float
    num_preemptions: int


@dataclass(frozen=True)
class Estimate:
    """The scheduler's prediction of a request's output length, in tokens."""

    mean: float
    p50: float
    p90: float
    source: str   # "blend", "head", "knn" or "prior"


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of output. ``index`` is the position of ``token_ids[0]``."""

    request_id: str
    token_ids: list[int]
    text: str
    index: int
    finish_reason: str | None = None   # "stop", "length" or "aborted" on the last chunk
    usage: Usage | None = None
    #: On the first chunk only: the length estimate and the prompt's token count.
    estimate: Estimate | None = None
    prompt_tokens: int | None = None
    #: With ``logprobs=k``: one per token of ``token_ids`` (its logprob and the k most likely
    #: tokens'). None for a chunk without them: the request did not ask, or a resumed stream
    #: catching up on tokens made while it was away (the scheduler keeps no logprobs for them).
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    #: One per token where every chunk with tokens carried its logprobs, else None.
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class Status:
    policy: str
    workers: list[dict] = field(default_factory=list)
    num_waiting: int = 0
    num_running: int = 0
    num_paused: int = 0
    num_finished: int = 0
    predictor_state: str = ""
    uptime_s: float = 0.0
    num_preemptions: int = 0
    preemptions_by_action: dict = field(default_factory=dict)
    model: str = ""
    max_model_len: int = 0
    #: Tokens admitted to workers, read from their prefix caches, and computed by prefills.
    num_admitted_tokens: int = 0
    num_cached_tokens: int = 0
    num_prefill_tokens: int = 0
