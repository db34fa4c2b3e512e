"""Which of a step's ranked candidates run, and how many tokens each feeds.

The walk (:func:`select`) goes down the candidates in the policy's order and takes each that
fits three budgets:

* sequences: at most ``max_num_seqs`` run;
* device blocks: every job that runs needs ``blocks_for(num_tokens)`` (its whole sequence,
  so a job that starts is sure to finish its prefill); a job that is not running yet must
  also leave room for the growth reserves of those taken before it and its own (the policy's
  ``reserve_tokens``, in blocks);
* tokens (chunked prefill): a step feeds at most ``max_num_batched_tokens``. Every running
  job that decodes feeds one token, and those tokens are set aside first, so decodes never
  stall behind a prompt. What is left is the prefill budget (capped by ``max_prefill_tokens``
  where the latency model limits what a chunk may add to the decode step beside it): jobs
  with more than one token to feed (a prompt, a recompute after a drop) take chunks of it in
  rank order. A running job whose chunk comes to 0 stays in the batch and waits for budget;
  a job that is not running starts (or resumes) only while some prefill budget is left.

A job that does not fit ends the walk, unless the policy backfills (then the walk goes on
with the jobs that still can fit). The walk is vectorized: a run of candidates that all fit
is taken at once (running sums), and with backfill the candidates that cannot fit what is
left are skipped at once; the budgets only shrink as jobs are taken, so the result is the
one-by-one walk's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budgets:
    max_num_seqs: int
    max_num_blocks: int
    max_num_batched_tokens: int
    #: Most prompt tokens the step may feed beside its decodes (None: the token budget's rest).
    max_prefill_tokens: int | None = None


def select(need: np.ndarray, uncomputed: np.ndarray, running: np.ndarray, budgets: Budgets,
           backfill: bool, grow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions taken, tokens each feeds) over the ranked candidates.

    ``need``: device blocks each needs; ``uncomputed``: tokens each has to feed before its
    next token (1 for a decode); ``running``: whether each is in the batch already; ``grow``:
    growth reserves in blocks (floats), or None for none.
    """
    n = len(need)
    decode = running & (uncomputed == 1)
    prefill = ~decode
    budget = budgets.max_num_batched_tokens - int(np.count_nonzero(decode))
    if budgets.max_prefill_tokens is not None:
        budget = min(budget, budgets.max_prefill_tokens)
    max_seqs, max_blocks = budgets.max_num_seqs, budgets.max_num_blocks
    pre_u = np.where(prefill, uncomputed, 0)
    taken: list[np.ndarray] = []
    num_taken = used = fed = 0
    reserved = 0.0
    i = 0
    while i < n and num_taken < max_seqs and used < max_blocks:
        end = min(n, i + max_seqs - num_taken)
        blocks = used + np.cumsum(need[i:end])
        fed_before = fed + (np.cumsum(pre_u[i:end]) - pre_u[i:end])  # integers: exact
        tokens_ok = running[i:end] | (fed_before < budget)
        if grow is None:
            blocks_ok = blocks <= max_blocks
        else:
            before = reserved + np.concatenate(([0.0], np.cumsum(grow[i:end])))
            limit = np.where(running[i:end], max_blocks, (max_blocks - before[:-1]) - grow[i:end])
            blocks_ok = blocks <= limit
        fits = blocks_ok & tokens_ok
        k = end - i if fits.all() else int(np.argmin(fits))
        if k:
            taken.append(np.arange(i, i + k))
            num_taken += k
            used = int(blocks[k - 1])
            fed = int(fed_before[k - 1] + pre_u[i + k - 1])
            if grow is not None:
                reserved = float(before[k])
            i += k
            continue
        if not backfill:
            break
        # Candidate i does not fit: skip to the next one that fits what is left.
        rest = slice(i + 1, n)
        if grow is None:
            ok = need[rest] <= max_blocks - used
        else:
            ok = used + need[rest] <= np.where(running[rest], max_blocks, (max_blocks - reserved) - grow[rest])
        ok &= running[rest] | (fed < budget)
        nxt = np.flatnonzero(ok)
        if not len(nxt):
            break
        i += 1 + int(nxt[0])
    positions = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
    return positions, feeds(uncomputed[positions], decode[positions], budget)


def feeds(uncomputed: np.ndarray, decode: np.ndarray, budget: int) -> np.ndarray:
    """Tokens each taken job feeds: 1 for a decode; chunks of the prefill budget in order."""
    pre_u = np.where(decode, 0, uncomputed)
    before = np.cumsum(pre_u) - pre_u  # integers: exact
    chunk = np.minimum(np.maximum(budget - before, 0), pre_u)
    return np.where(decode, 1, chunk)
