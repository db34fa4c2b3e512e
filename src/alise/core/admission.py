"""Which of a step's ranked candidates run, and how many tokens each feeds.

The walk (:func:`select`) goes down the candidates in the policy's order and takes each that
fits three budgets:

* sequences: at most ``max_num_seqs`` run;
* device blocks: every job that runs needs ``blocks_for(num_tokens)`` (its whole sequence,
  so a job that starts is sure to finish its prefill); a job that is not running yet must
  also leave room for the growth reserves of those taken before it and its own (the policy's
  ``reserve_tokens``, in blocks; a job's own never takes it past the whole cache:
  :func:`growth_blocks`);
* tokens (chunked prefill): a step feeds at most ``max_num_batched_tokens``. Every running
  job that decodes feeds one token, and those tokens are set aside first, so decodes never
  stall behind a prompt. What is left is the prefill budget (capped by ``max_prefill_tokens``
  where the latency model limits what a chunk may add to the decode step beside it): jobs
  with more than one token to feed (a prompt, a recompute after a drop) take chunks of it in
  rank order. A running job whose chunk comes to 0 stays in the batch and waits for budget;
  a job that is not running starts (or resumes) only while some prefill budget is left.

A job that does not fit ends the walk, unless the policy backfills (then the walk goes on
with the jobs that still can fit). The walk is vectorized: a run of candidates that all fit
is taken at once (running sums; the few jobs in it that are not running yet are checked one
by one on those sums), and with backfill the candidates that cannot fit what is left are
skipped at once; once the prefill tokens are spent, the running jobs left are taken at once
where they all fit. The budgets only shrink as jobs are taken, so the result is the
one-by-one walk's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Budgets(NamedTuple):  # (a tuple: made once a plan, cheaper than a frozen dataclass)
    max_num_seqs: int
    max_num_blocks: int
    max_num_batched_tokens: int
    #: Most prompt tokens the step may feed beside its decodes (None: the token budget's rest).
    max_prefill_tokens: int | None = None


def growth_blocks(reserve_tokens: np.ndarray, need: np.ndarray, num_blocks: int, block_size: int) -> np.ndarray:
    """Growth reserves in blocks (floats): ``reserve_tokens`` over ``block_size``, but never
    more than the ``num_blocks`` of the whole cache leave beside each job's ``need``.

    NOTE: a job never grows past the whole cache (the worker ends it there: ``max_model_len``
    is capped at it), so a job that fits an empty worker is admitted there; else its own
    reserve would keep it waiting for room no worker ever has."""
    return np.minimum(reserve_tokens / block_size, np.maximum(num_blocks - need, 0))


def select(need: np.ndarray, uncomputed: np.ndarray, running: np.ndarray, budgets: Budgets,
           backfill: bool, grow: np.ndarray | None = None, decode: np.ndarray | None = None,
           num_decodes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions taken, tokens each feeds) over the ranked candidates.

    ``need``: device blocks each needs; ``uncomputed``: tokens each has to feed before its
    next token (1 for a decode); ``running``: whether each is in the batch already; ``grow``:
    growth reserves in blocks (floats), or None for none; ``decode``: ``running & (uncomputed
    == 1)`` and ``num_decodes`` its count, where the caller has them.
    """
    n = len(need)
    if decode is None:
        decode = running & (uncomputed == 1)
    if num_decodes is None:
        num_decodes = int(np.count_nonzero(decode))
    budget = budgets.max_num_batched_tokens - num_decodes
    if budgets.max_prefill_tokens is not None:
        budget = min(budget, budgets.max_prefill_tokens)
    max_seqs, max_blocks = budgets.max_num_seqs, budgets.max_num_blocks
    pre_u = uncomputed - decode  # a decode's one token is set aside: 0 here
    taken: list[np.ndarray] = []
    num_taken = used = fed = 0
    reserved = 0.0
    i = 0
    while i < n and num_taken < max_seqs and used < max_blocks:
        if fed >= budget:  # only running jobs fit the tokens now, and they hold no reserve back
            tail = _take_running(need, running, i, max_seqs - num_taken, max_blocks - used, backfill)
            if tail is not None:
                taken.append(tail)
                break
        end = min(n, i + max_seqs - num_taken)
        k, used, fed, reserved = _fit_run(need, pre_u, running, grow, i, end, used, fed, reserved, budget,
                                          max_blocks)
        if k:
            taken.append(np.arange(i, i + k))
            num_taken += k
            i += k
            continue
        # Candidate i does not fit: with backfill, skip to the next one that fits what is left.
        nxt = _next_fit(need, running, grow, i + 1, used, max_blocks, reserved, fed < budget) if backfill else None
        if nxt is None:
            break
        i = nxt
    positions = taken[0] if len(taken) == 1 else np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
    return positions, feeds(pre_u[positions], decode[positions], budget)


def _fit_run(need: np.ndarray, pre_u: np.ndarray, running: np.ndarray, grow: np.ndarray | None, start: int,
             end: int, used: int, fed: int, reserved: float, budget: int,
             max_blocks: int) -> tuple[int, int, int, float]:
    """(k, blocks used, prefill tokens fed, reserves held) once the candidates ``start`` to
    ``start + k`` are taken: the longest run from ``start`` (before ``end``) in which each fits
    what those before it left (``used``, ``fed`` and ``reserved`` before the run).

    A running job fits while the blocks do; since every ``need`` is at least 0, the sums only
    grow, so the run stops at the first job past the blocks, or sooner at a job that is not
    running and finds the prefill tokens spent or its reserve short. Those are few (the batch
    runs ahead of the queue), so they are checked one by one on the run's sums."""
    blocks = need[start:end].cumsum()  # from 0; plus ``used``
    k = int(blocks.searchsorted(max_blocks - used, side="right"))
    fed_after = pre_u[start:end].cumsum()  # from 0; plus ``fed``
    sums = None if grow is None else grow[start:end].cumsum()  # reserves, from 0; plus ``reserved``
    for j in (~running[start:end]).nonzero()[0].tolist():
        if j >= k:
            break
        if fed + fed_after.item(j) - pre_u.item(start + j) >= budget:
            k = j
            break
        if grow is not None and sums is not None:
            # NOTE: the reserves are one running sum from ``reserved`` (floats: the order of the
            # additions is part of the decision).
            before = sums.item(j - 1) if j else 0.0
            if reserved:
                before += reserved
            if used + blocks.item(j) > (max_blocks - before) - grow.item(start + j):
                k = j
                break
    if not k:
        return 0, used, fed, reserved
    if sums is not None:
        reserved = sums.item(k - 1) + reserved if reserved else sums.item(k - 1)
    return k, used + blocks.item(k - 1), fed + fed_after.item(k - 1), reserved


def _next_fit(need: np.ndarray, running: np.ndarray, grow: np.ndarray | None, start: int, used: int,
              max_blocks: int, reserved: float, can_start: bool) -> int | None:
    """The first position from ``start`` on that fits the blocks left (``used`` of
    ``max_blocks``, and for a job that is not running the reserves: ``reserved`` so far and
    its own) and the tokens (a job that is not running only if ``can_start``); None: none."""
    rest = slice(start, len(need))
    if grow is None:
        ok = need[rest] <= max_blocks - used
    else:
        ok = used + need[rest] <= np.where(running[rest], max_blocks, (max_blocks - reserved) - grow[rest])
    if not can_start:
        ok &= running[rest]
    nxt = int(ok.argmax()) if len(ok) else 0
    return start + nxt if len(ok) and ok[nxt] else None


def _take_running(need: np.ndarray, running: np.ndarray, start: int, num_seqs: int, num_blocks: int,
                  backfill: bool) -> np.ndarray | None:
    """Positions from ``start`` on that the walk takes once the step's prefill tokens are
    spent: the running jobs in order (without backfill, up to the first job that is not
    running), when all of them up to ``num_seqs`` fit ``num_blocks``; None when the blocks
    bind (then the walk goes on a run at a time)."""
    run = running[start:]
    if not backfill:
        stop = int(run.argmin())
        if run[stop]:
            stop = len(run)
        run = run[:stop]
    positions = run.nonzero()[0][:num_seqs] + start
    # Strictly fewer: the walk stops once the blocks are all taken, even for a job needing none.
    return positions if int(need[positions].sum()) < num_blocks else None


def feeds(prefill: np.ndarray, decode: np.ndarray, budget: int) -> np.ndarray:
    """Tokens each taken job feeds: 1 for a decode; chunks of the prefill budget in order
    (``prefill``: each job's uncomputed tokens, 0 for a decode): a job's chunk is what the
    budget has left after the whole prefill of every job before it, at most its own."""
    fed = decode.astype(np.int64)  # a decode's chunk is 0 (its ``prefill``): 1
    left = budget
    for i in prefill.nonzero()[0].tolist():  # (the few jobs in a prefill, one by one)
        n = prefill.item(i)
        fed[i] = min(max(left, 0), n)
        left -= n
    return fed
