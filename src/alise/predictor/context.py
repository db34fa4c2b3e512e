"""Conversation context: the lengths of the earlier answers of the conversation a prompt continues.

Model, in ``z = log1p(output tokens)`` space. A conversation has an effect ``u`` of its own,
the same on each of its turns: how much more or less than the served model's usual its answers
say (its system prompt, what its user asks for, its topic). Each answer's deviation from the
model's mean log-length (``offset``) is ``u`` plus its own prompt's effect and noise; across
conversations ``u`` has variance ``tau2``, the rest ``sigma2``. Given ``n`` earlier answers
with mean deviation ``d``, the best linear estimate of ``u`` is ``w(n) * d`` with
``w(n) = n / (n + k)``, ``k = sigma2 / tau2``: no shift without earlier answers, more trust as
they accumulate. The estimator adds it to its estimate from the prompt alone, in log space.

``k`` is fitted by moments (:class:`ContextMoments`) from pairs of an answer and the mean of
its conversation's earlier answers (both as log-lengths): their covariance is ``tau2``, the
answers' variance ``tau2 + sigma2``. The covariance is shrunk toward 0 by ``PRIOR_PAIRS``
pairs of no evidence, so a predictor that has seen few conversations shifts little, and one
whose conversations do not differ (one model answering unrelated requests) learns ``k`` large
or infinite: no shift. It needs lengths only: the service learns it from the Predicts that
came with earlier answers as their observations arrive; any log of conversations fits it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Earlier answers looked at: the most recent ones (a conversation's style may drift).
MAX_PREVIOUS = 64


@dataclass(frozen=True)
class PromptContext:
    """What is known of a prompt besides its text (validated: lengths >= 0)."""

    #: Output tokens of the conversation's earlier answers, oldest first.
    previous_output_tokens: tuple[int, ...] = ()
    #: Read in place of the prompt: its own text, without what it is rendered with ("": the prompt).
    query: str = ""


#: Pairs of no evidence the covariance of :class:`ContextMoments` is shrunk by.
PRIOR_PAIRS = 100


def earlier_log_length(previous: Sequence[int]) -> tuple[int, float]:
    """(how many earlier answers count, their mean log-length): the last ``MAX_PREVIOUS``."""
    z = np.log1p(np.asarray(previous[-MAX_PREVIOUS:], np.float64))
    return len(z), float(z.mean()) if len(z) else 0.0


def context_shift(previous: Sequence[Sequence[int]], offset: float, prior_turns: float) -> np.ndarray:
    """Per prompt, ``w(n) * d`` (the module's model) from its earlier answers' output tokens
    (oldest first; empty: no shift)."""
    out = np.zeros(len(previous))
    if not math.isfinite(prior_turns):
        return out
    for i, lengths in enumerate(previous):
        n, mean = earlier_log_length(lengths)
        if n:
            out[i] = n / (n + prior_turns) * (mean - offset)
    return out


@dataclass
class ContextMoments:
    """Running sums over (answer, its conversation's earlier answers) pairs of one model, in
    log-lengths: what ``k`` is fitted from (module doc)."""

    num_pairs: int = 0
    sum_y: float = 0.0
    sum_yy: float = 0.0
    sum_p: float = 0.0
    sum_yp: float = 0.0

    def add(self, output_tokens: int, previous: Sequence[int]) -> None:
        """An answer of ``output_tokens`` after earlier answers ``previous`` (none: ignored)."""
        n, p = earlier_log_length(previous)
        if not n:
            return
        y = math.log1p(output_tokens)
        self.num_pairs += 1
        self.sum_y += y
        self.sum_yy += y * y
        self.sum_p += p
        self.sum_yp += y * p

    def prior_turns(self) -> float:
        """``k = sigma2 / tau2``; inf (no shift) when the shrunk covariance is not positive."""
        n = self.num_pairs
        if n < 2:
            return math.inf
        mean_y, mean_p = self.sum_y / n, self.sum_p / n
        var = self.sum_yy / n - mean_y * mean_y
        cov = (self.sum_yp / n - mean_y * mean_p) * n / (n + PRIOR_PAIRS)
        if cov <= 0 or var <= cov:
            return math.inf
        return (var - cov) / cov


def fit_prior_turns(conversations: Sequence[Sequence[int]]) -> float:
    """``k`` from each conversation's answer lengths, in turn order: every answer after the
    first paired with those before it, as the service pairs them."""
    moments = ContextMoments()
    for lengths in conversations:
        for t in range(1, len(lengths)):
            moments.add(lengths[t], lengths[:t])
    return moments.prior_turns()
