"""Sampling parameters as a plain dataclass, validated once at the edge.

The scheduler converts the protobuf message into this type (``from_proto`` lives in the
service layer); everything inward sees only this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: A request asking for more tokens than this is refused, whatever the model's context.
MAX_TOKENS_LIMIT = 1_000_000
#: OpenAI's bounds: presence and frequency penalties in [-2, 2], logit biases in [-100, 100],
#: and (its limit on entries) at most 300 biased tokens.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
#: The most alternatives a token's logprobs may list (vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20


def check_penalty(name: str, value: float) -> None:
    """``presence_penalty`` and ``frequency_penalty``: finite, in [-2, 2] (OpenAI's and vLLM's)."""
    if not math.isfinite(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
        raise ValueError(f"{name} must be in [-2, 2], got {value!r}")


def check_repetition_penalty(value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"repetition_penalty must be finite and > 0, got {value!r}")


def check_min_tokens(min_tokens: int, max_tokens: int | None) -> None:
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens must be at most max_tokens ({max_tokens}), got {min_tokens}")


def check_logit_bias(bias: Mapping[int, float] | Iterable[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """The bias as ``((token_id, bias), ...)`` sorted by token id, or a ValueError naming what
    is wrong: at most 300 entries, ids >= 0 (the vocabulary's end is the model's to check),
    biases finite in [-100, 100]."""
    pairs = list(bias.items() if isinstance(bias, Mapping) else bias)
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
    for token_id, value in pairs:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias of token {token_id} must be a number in [-100, 100], got {value!r}")
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias names a token id more than once")
    return tuple(sorted((t, float(v)) for t, v in pairs))


def check_logprobs(name: str, value: int | None) -> None:
    """``logprobs`` (completions) or ``top_logprobs`` (chat): None, or an integer in [0, 20]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    ``temperature == 0`` means greedy; ``top_p == 1``, ``top_k == 0`` and ``min_p == 0``
    disable those filters. ``min_p`` keeps the tokens at least ``min_p`` times as likely as
    the most likely one (after temperature), as vLLM's does. ``seed`` makes the request's
    draws reproducible regardless of batch-mates.

    vLLM's logit adjustments, on the raw logits before temperature (greedy rows too), in its
    order: ``logit_bias`` (token id -> bias, sorted by id) is added; before ``min_tokens``
    output tokens exist, the stop token ids and the model's EOS cannot be sampled (nor end the
    job); then ``repetition_penalty`` divides the positive and multiplies the negative logits
    of the tokens in the prompt or the output (1 = none), ``frequency_penalty`` subtracts
    itself times each token's count in the output and ``presence_penalty`` itself once per
    token present in the output (0 = none).

    ``logprobs`` (None: none) asks, for every output token, its log-probability and those of
    the ``logprobs`` most likely tokens: vLLM's default ``raw_logprobs``, the log-softmax of the
    model's logits before any adjustment, temperature or filter.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    logprobs: int | None = None
    #: Set from the fields above: the sampler needs the tokens so far (a penalty or
    #: ``min_tokens``), and it changes the logits at all (those, or a bias); a step needs more
    #: for the row than its sampled id (its token history, or its logprobs). Read per row and
    #: per step, where most rows ask for none.
    needs_history: bool = field(init=False, repr=False, compare=False)
    adjusts_logits: bool = field(init=False, repr=False, compare=False)
    needs_extras: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be at most {MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        check_penalty("presence_penalty", self.presence_penalty)
        check_penalty("frequency_penalty", self.frequency_penalty)
        check_repetition_penalty(self.repetition_penalty)
        check_min_tokens(self.min_tokens, self.max_tokens)
        object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias))
        check_logprobs("logprobs", self.logprobs)
        object.__setattr__(self, "needs_history", self.has_penalties or self.min_tokens > 0)
        object.__setattr__(self, "adjusts_logits", self.needs_history or bool(self.logit_bias))
        object.__setattr__(self, "needs_extras", self.needs_history or self.logprobs is not None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the tokens so far (a penalty other than none)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def can_stop(self, num_output_before: int) -> bool:
        """Whether a stop token id or EOS may be sampled, and end the job, after
        ``num_output_before`` output tokens (``min_tokens`` of them must come first)."""
        return num_output_before >= self.min_tokens
