"""The rules of a request's sampling fields that need no model: one implementation, read by the
SDK (to refuse a bad argument before the call) and by the scheduler (``alise.core.sampling``,
which refuses it again from any client). Standard library only: the client-only install
(alise-client) ships this module beside the SDK, and nothing of the server's; the core imports
it without grpc.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

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
