"""Sampling parameters as a plain dataclass, validated once at the edge.

The scheduler converts the protobuf message into this type (``from_proto`` lives in the
service layer); everything inward sees only this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The rules the SDK checks too, before a call (alise-client ships that module, not this one).
from alise.sampling_rules import (
    check_logit_bias,
    check_logprobs,
    check_min_tokens,
    check_penalty,
    check_repetition_penalty,
)

#: A request asking for more tokens than this is refused, whatever the model's context.
MAX_TOKENS_LIMIT = 1_000_000


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
    #: for the row than its plain sampled id (an adjustment, or its logprobs). Read per row and
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
        object.__setattr__(self, "needs_extras", self.adjusts_logits or self.logprobs is not None)

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
