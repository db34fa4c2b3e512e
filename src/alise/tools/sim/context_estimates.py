"""Cross-fitted length estimates for traces of conversations, with and without their context.

As in ``predictions.py``, no request is predicted by a fit that saw its own answer. What
differs for conversations:

* Folds hold whole conversations (with any other conversation that shares an instruction),
  so no turn of a test conversation and no other answer to its instructions is in the
  training history.
* Within a test fold, requests are predicted in arrival order and each is observed after it
  is predicted, as a serving predictor's history grows (the fit itself is the fold's, as a
  refit only comes every so often): a later turn can find the earlier turns of its own
  conversation among its neighbours. That is what today's predictor gets out of a
  conversation without being told about it.
* ``text``: what the estimator reads of a request: ``"prompt"``, the whole rendered prompt,
  which is what the scheduler sends today (the encoder sees its first 256 tokens, the TF-IDF
  head what the encoder saw); or ``"query"``, the latest user message (``TraceRequest.query``).
* Each request is predicted twice: alone, and with the output tokens of its conversation's
  earlier turns (``trace.previous_outputs``). The shift's ``k`` is learned as the service
  learns it: every training request with earlier turns is a pair fed to
  ``LengthEstimator.observe_context``, and so is each test request once observed; or it is
  given (``prior_turns``).

Each fold's history also holds every AlpacaEval generator's lengths of the training folds'
instructions, under its own name (the warm-up the service bootstraps from); the trace's answers
are the served model's, ``"served"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alise.core.job import LengthEstimate
from alise.tools.trace import TraceRequest, previous_outputs

logger = logging.getLogger(__name__)

TEXTS = ("prompt", "query")
SERVED = "served"


@dataclass
class CrossFit:
    """Per request (trace order): the estimate alone and with its conversation's context."""

    plain: list[LengthEstimate]
    with_context: list[LengthEstimate]
    #: Each fold's ``k`` from its training requests (inf: no shift).
    prior_turns: list[float]
    text: str


def fold_groups(requests: Sequence[TraceRequest]) -> list[str]:
    """Per request, a group id: requests linked by a conversation or by an instruction id share
    one (connected components), so a fold never splits them."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in requests:
        a, b = find("p:" + r.id), find("c:" + (r.conversation_id or r.id))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find("p:" + r.id) for r in requests]


def _history(encoded, texts: list[str], rows: Sequence[int], outputs: Sequence[int],
             warm: tuple[list[str], list[str], list[int]], dim: int):
    """A history of the training requests' texts (rows of ``encoded``) under ``SERVED`` plus the
    warm-up answers (text, generator, tokens) whose text is among ``texts``."""
    from alise.predictor.history import History
    from alise.predictor.index import VectorIndex

    history = History(VectorIndex(dim))
    index_of = {t: i for i, t in enumerate(texts)}
    obs_rows, obs_models, obs_tokens = [], [], []
    for r, y in zip(rows, outputs, strict=True):
        obs_rows.append(int(history.add_prompts([texts[r]], encoded.vectors[[r]], [encoded.num_tokens[r]])[0]))
        obs_models.append(SERVED)
        obs_tokens.append(y)
    for text, model, n in zip(*warm, strict=True):
        r = index_of[text]
        obs_rows.append(int(history.add_prompts([text], encoded.vectors[[r]], [encoded.num_tokens[r]])[0]))
        obs_models.append(model)
        obs_tokens.append(n)
    history.add_observations(np.asarray(obs_rows, np.int64), obs_models, obs_tokens)
    return history


def _estimate(est, k: int, source: str) -> LengthEstimate:
    return LengthEstimate(mean=float(est.mean[k]), p50=float(est.p50[k]), p90=float(est.p90[k]), source=source)


def conversation_cross_fit(requests: Sequence[TraceRequest], *, text: str = "query", num_folds: int = 5,
                           seed: int = 0, encoder=None, prior_turns: float | None = None) -> CrossFit:
    """Estimates of every request of a conversation trace (module doc), ``num_folds`` folds;
    ``prior_turns``: the shift's ``k`` (None: learned, module doc)."""
    from alise.predictor.encoder import Encoder
    from alise.predictor.estimator import EstimatorConfig, LengthEstimator
    from alise.predictor.fitting import refit
    from alise.tools.sim.folds import alpaca_eval_observations, fold_of

    if text not in TEXTS:
        raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {text!r}")
    encoder = encoder or Encoder()
    read = [r.prompt if text == "prompt" else r.text for r in requests]
    instructions = sorted({r.text for r in requests})
    warm_all = alpaca_eval_observations(instructions)
    texts = sorted(set(read) | set(warm_all[0]))
    encoded = encoder.encode(texts)
    seen = [t[:n] for t, n in zip(texts, encoded.visible_chars, strict=True)]  # what the service stores of each
    row = {t: i for i, t in enumerate(texts)}
    groups = fold_groups(requests)
    fold = fold_of(groups, num_folds, seed)
    previous = previous_outputs(requests)
    plain: list[LengthEstimate | None] = [None] * len(requests)
    with_context: list[LengthEstimate | None] = [None] * len(requests)
    priors = []
    for f in range(num_folds):
        train = [i for i, g in enumerate(groups) if fold[g] != f]
        test = sorted((i for i, g in enumerate(groups) if fold[g] == f), key=lambda i: requests[i].arrival_s)
        if not test:
            continue
        train_texts = {requests[i].text for i in train}
        warm = tuple(zip(*[w for w in zip(*warm_all, strict=True) if w[0] in train_texts], strict=True)) or ([], [], [])
        history = _history(encoded, seen, [row[read[i]] for i in train],
                           [requests[i].output_tokens for i in train],
                           ([seen[row[t]] for t in warm[0]], list(warm[1]), list(warm[2])),
                           encoded.vectors.shape[1])
        estimator = LengthEstimator(history, EstimatorConfig(context_prior_turns=prior_turns))
        refit(estimator)
        for i in train:
            estimator.observe_context(SERVED, requests[i].output_tokens, previous[i])
        priors.append(estimator.context_prior_turns(SERVED))
        for i in test:
            r = row[read[i]]
            args = (encoded.vectors[[r]], [seen[r]], np.asarray([encoded.num_tokens[r]]), SERVED)
            plain[i] = _estimate(estimator.predict(*args), 0, "alise.predictor-crossfit")
            with_context[i] = _estimate(estimator.predict(*args, previous_output_tokens=[previous[i]]), 0,
                                        "alise.predictor+context-crossfit")
            new = history.add_prompts([seen[r]], encoded.vectors[[r]], [encoded.num_tokens[r]])
            history.add_observations(new, [SERVED], [requests[i].output_tokens])
            estimator.sync()
            estimator.observe_context(SERVED, requests[i].output_tokens, previous[i])
        logger.info("fold %d/%d: %d test requests, k %.2f from the training requests", f + 1, num_folds,
                    len(test), priors[-1])
    return CrossFit(list(plain), list(with_context), priors, text)


def metrics(estimates: Sequence[LengthEstimate], requests: Sequence[TraceRequest],
            select: Sequence[int] | None = None) -> dict[str, float]:
    """Kendall tau (p50 against the true length), MAE of p50 in tokens, p90 coverage."""
    from scipy import stats

    idx = list(range(len(requests))) if select is None else list(select)
    p50 = np.array([estimates[i].p50 for i in idx])
    p90 = np.array([estimates[i].p90 for i in idx])
    y = np.array([requests[i].output_tokens for i in idx], np.float64)
    return dict(kendall_tau=float(stats.kendalltau(p50, y).statistic), mae=float(np.abs(p50 - y).mean()),
                p90_coverage=float((y <= p90).mean()), num=len(idx))
