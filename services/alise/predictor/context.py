"""Conversation context: the lengths of the earlier answers of the conversation a prompt continues.

Model, in ``z = log1p(output tokens)`` space. A conversation has an effect ``u`` of its own,
the same on each of its turns: how much more or less than the served model's usual its answers
say (its system prompt, what its user asks for, its topic). Each answer's deviation from the
model's mean log-length (``offset``) is ``u`` plus its own prompt's effect and noise; across
conversations ``u`` has variance ``tau2``, the rest ``sigma2``. Given ``n`` earlier answers
with mean deviation ``d``, the best linear estimate of ``u`` is ``w(n) * d`` with
``w(n) = n / (n + k)``, ``k = sigma2 / tau2``: no shift without earlier answers, more trust as
they accumulate. The estimator adds it to its estimate from the prompt alone, in log space.

``k`` (``EstimatorConfig.context_prior_turns``) is fitted by moments on conversations' answer
lengths (:func:`fit_prior_turns`): ``tau2`` is the mean product of two different answers'
deviations within a conversation, ``sigma2`` their variance less ``tau2``. It needs no
predictions, only lengths, so any log of conversations fits it.
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


def context_shift(previous: Sequence[Sequence[int]], offset: float, prior_turns: float) -> np.ndarray:
    """Per prompt, ``w(n) * d`` (the module's model) from its earlier answers' output tokens
    (oldest first; empty: no shift)."""
    out = np.zeros(len(previous))
    if not math.isfinite(prior_turns):
        return out
    for i, lengths in enumerate(previous):
        if len(lengths):
            z = np.log1p(np.asarray(lengths[-MAX_PREVIOUS:], np.float64))
            out[i] = len(z) / (len(z) + prior_turns) * (float(z.mean()) - offset)
    return out


def fit_prior_turns(conversations: Sequence[Sequence[int]]) -> float:
    """``k = sigma2 / tau2`` by moments from each conversation's answer lengths; ``inf`` (no
    shift) when answers within a conversation are no more alike than any two answers, or
    when no conversation has two answers."""
    z = [np.log1p(np.asarray(c, np.float64)) for c in conversations if len(c)]
    if not z:
        return math.inf
    mean = float(np.concatenate(z).mean())
    pair_sum = pair_count = 0.0
    for c in z:
        d = c - mean
        pair_sum += float(d.sum() ** 2 - (d * d).sum())  # sum over ordered pairs i != j of d_i d_j
        pair_count += len(d) * (len(d) - 1)
    if pair_count == 0:
        return math.inf
    tau2 = pair_sum / pair_count
    total = float(np.mean(np.concatenate(z) ** 2) - mean**2)
    if tau2 <= 0 or total <= tau2:
        return math.inf
    return (total - tau2) / tau2
