"""Sampling parameters as a plain dataclass, validated once at the edge.

The scheduler converts the protobuf message into this type (``from_proto`` lives in the
service layer); everything inward sees only this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: A request asking for more tokens than this is refused, whatever the model's context.
MAX_TOKENS_LIMIT = 1_000_000


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    ``temperature == 0`` means greedy; ``top_p == 1``, ``top_k == 0`` and ``min_p == 0``
    disable those filters. ``min_p`` keeps the tokens at least ``min_p`` times as likely as
    the most likely one (after temperature), as vLLM's does. ``seed`` makes the request's
    draws reproducible regardless of batch-mates.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
