"""Cross-fitted length estimates for simulated ``alise`` runs.

The gain a simulation shows must be one a deployment could get, so no request may be
predicted by a model that saw its own output. The trace's distinct prompts are split into
``num_folds`` folds (grouped by prompt id, so a prompt repeated in the trace stays in one
fold); each fold is predicted by a predictor built from the other folds only.

Two predictors:

* ``predictor`` — the project's length predictor (``alise.predictor``: kNN + learned heads
  over MiniLM embeddings), one fit per fold through its public classes;
* ``knn``       — a self-contained fallback: all-MiniLM-L6-v2 embeddings, the 10 most similar
  training prompts by cosine, similarity-weighted mean / median / 90th percentile of their
  lengths (the ``knn10`` reference of ``shared/data/README.md``).

Estimates are cached beside the trace (``<trace>.estimates-<method>.json``), keyed by the
trace's prompts and lengths, so a sweep computes them once.

What is predicted from is each request's own text (``TraceRequest.text``: without a system
prompt it was rendered after). A trace of conversations is cross-fitted by conversation
(``context_estimates.py``), each request with its conversation's earlier answers' lengths:
the predictor as it serves a scheduler that sends it the query and those lengths.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from alise.core.job import LengthEstimate
from alise.tools.sim.folds import alpaca_eval_observations, fold_of
from alise.tools.trace import TraceRequest

logger = logging.getLogger(__name__)

METHODS = ("auto", "predictor", "knn")


def _weighted_quantile(values, weights, q: float) -> float:
    import numpy as np

    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    cut = q * cum[-1]
    return float(values[order][min(int(np.searchsorted(cum, cut)), len(order) - 1)])


def knn_cross_fit(prompts: dict[str, str], lengths: dict[str, int], folds: dict[str, int], *,
                  k: int = 10) -> dict[str, LengthEstimate]:
    """Per distinct prompt id, an estimate from its k nearest neighbours in the other folds."""
    import numpy as np

    from alise.predictor.encoder import Encoder

    ids = sorted(prompts)
    vectors = Encoder().encode([prompts[i] for i in ids]).vectors
    y = np.array([lengths[i] for i in ids], dtype=np.float64)
    fold = np.array([folds[i] for i in ids])
    sims = vectors @ vectors.T
    out = {}
    for row, pid in enumerate(ids):
        train = np.flatnonzero(fold != fold[row])
        top = train[np.argsort(-sims[row, train])[:k]]
        w = np.maximum(sims[row, top], 1e-3)
        vals = y[top]
        out[pid] = LengthEstimate(mean=float(np.average(vals, weights=w)),
                                  p50=_weighted_quantile(vals, w, 0.5),
                                  p90=_weighted_quantile(vals, w, 0.9), source="knn10-crossfit")
    return out


def _warm_up_observations(prompts: dict[str, str], trace_model_lengths: dict[str, int]):
    """Other models' output lengths for the trace's prompts (AlpacaEval files beside the
    workload's), as the predictor service warms up; the trace's own model is excluded."""
    by_text = {text: pid for pid, text in prompts.items()}
    texts, models, lengths = alpaca_eval_observations(list(by_text))
    # The file whose lengths equal the trace's is the trace's own model: leave it out.
    own = {}
    for text, model, n in zip(texts, models, lengths, strict=True):
        pid = by_text[text]
        own[model] = own.get(model, 0) + (trace_model_lengths.get(pid) == max(n, 1))
    trace_model = max(own, key=own.get) if own else ""
    keep = [i for i, m in enumerate(models) if m != trace_model]
    return ([texts[i] for i in keep], [models[i] for i in keep], [lengths[i] for i in keep],
            trace_model or "trace")


def predictor_cross_fit(prompts: dict[str, str], lengths: dict[str, int],
                        folds: dict[str, int]) -> dict[str, LengthEstimate]:
    """The project's length predictor (``alise.predictor``), fitted once per fold on the other
    folds' prompts: their lengths under the trace's model and, for AlpacaEval prompts, under
    the other models too (the service's warm-up). Nothing about a test prompt is visible."""
    import numpy as np

    from alise.predictor.encoder import Encoder
    from alise.predictor.estimator import LengthEstimator
    from alise.predictor.fitting import refit
    from alise.predictor.history import History
    from alise.predictor.index import VectorIndex

    ids = sorted(prompts)
    encoder = Encoder()
    encoded = encoder.encode([prompts[i] for i in ids])
    row_of = {pid: r for r, pid in enumerate(ids)}
    row_of_text = {prompts[pid]: r for r, pid in enumerate(ids)}
    w_texts, w_models, w_lengths, model = _warm_up_observations(prompts, lengths)
    out: dict[str, LengthEstimate] = {}
    for fold in sorted(set(folds.values())):
        train = [pid for pid in ids if folds[pid] != fold]
        test = [pid for pid in ids if folds[pid] == fold]
        history = History(VectorIndex(encoded.vectors.shape[1]))
        rows = [row_of[p] for p in train]
        new_rows = history.add_prompts([prompts[p] for p in train], encoded.vectors[rows],
                                       [encoded.num_tokens[r] for r in rows])
        hist_row = dict(zip(train, new_rows, strict=True))
        obs_rows = [hist_row[p] for p in train]
        obs_models = [model] * len(train)
        obs_lengths = [lengths[p] for p in train]
        for text, m, n in zip(w_texts, w_models, w_lengths, strict=True):
            pid = ids[row_of_text[text]]
            if pid in hist_row:
                obs_rows.append(hist_row[pid])
                obs_models.append(m)
                obs_lengths.append(n)
        history.add_observations(np.asarray(obs_rows, np.int64), obs_models, obs_lengths)
        estimator = LengthEstimator(history)
        refit(estimator)
        rows = [row_of[p] for p in test]
        est = estimator.predict(encoded.vectors[rows], [prompts[p] for p in test],
                                np.asarray([encoded.num_tokens[r] for r in rows]), model)
        for k, pid in enumerate(test):
            out[pid] = LengthEstimate(mean=float(est.mean[k]), p50=float(est.p50[k]),
                                      p90=float(est.p90[k]), source="alise.predictor-crossfit")
    return out


def _cache_key(requests: Sequence[TraceRequest], method: str, num_folds: int, seed: int) -> str:
    h = hashlib.sha256(f"{method}|{num_folds}|{seed}".encode())
    for r in requests:
        h.update(f"{r.id}\0{r.output_tokens}\0{r.text}\0{r.conversation_id}\0{r.turn}\0".encode())
    return h.hexdigest()[:16]


def cross_fitted_estimates(requests: Sequence[TraceRequest], *, method: str = "auto",
                           num_folds: int = 5, seed: int = 0,
                           cache_path: str | Path | None = None
                           ) -> tuple[dict[int, LengthEstimate], str]:
    """Estimates by request index, and the name of the predictor that made them."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    # A request's estimate depends on its text alone, or also on its conversation's turns.
    conversational = any(r.conversation_id for r in requests)
    names = [str(i) if conversational else r.id for i, r in enumerate(requests)]
    key = _cache_key(requests, method, num_folds, seed)
    if cache_path is not None and Path(cache_path).is_file():
        cached = json.loads(Path(cache_path).read_text())
        if cached.get("key") == key:
            by_name = {name: LengthEstimate(**e) for name, e in cached["estimates"].items()}
            return {i: by_name[name] for i, name in enumerate(names)}, cached["source"]
    if conversational:
        by_name, source = _conversation_estimates(requests, method, num_folds, seed)
    else:
        by_name, source = _prompt_estimates(requests, method, num_folds, seed)
    if cache_path is not None:
        Path(cache_path).write_text(json.dumps(dict(
            key=key, source=source,
            estimates={name: dict(mean=e.mean, p50=e.p50, p90=e.p90, source=e.source)
                       for name, e in by_name.items()})))
    return {i: by_name[name] for i, name in enumerate(names)}, source


def _prompt_estimates(requests: Sequence[TraceRequest], method: str, num_folds: int, seed: int):
    """By prompt id (a prompt repeated in the trace is one)."""
    prompts = {r.id: r.text for r in requests}
    lengths = {r.id: r.output_tokens for r in requests}
    folds = fold_of(list(prompts), num_folds, seed)
    if method in ("auto", "predictor"):
        try:
            return predictor_cross_fit(prompts, lengths, folds), f"alise.predictor, {num_folds}-fold cross-fit"
        except ImportError as exc:
            if method == "predictor":
                raise
            logger.info("predictor cross-fit unavailable (%s); using the kNN fallback", exc)
    return knn_cross_fit(prompts, lengths, folds), f"knn10 over MiniLM (fallback), {num_folds}-fold cross-fit"


def _conversation_estimates(requests: Sequence[TraceRequest], method: str, num_folds: int, seed: int):
    """By request index (the context differs by turn)."""
    from alise.tools.sim.context_estimates import conversation_cross_fit

    if method == "knn":
        raise ValueError("a trace of conversations is cross-fitted by the predictor (method auto or predictor)")
    fit = conversation_cross_fit(requests, text="query", num_folds=num_folds, seed=seed)
    return ({str(i): e for i, e in enumerate(fit.with_context)},
            f"alise.predictor on each request's query with its conversation's earlier answers, "
            f"{num_folds}-fold cross-fit by conversation")


def kendall_tau(estimates: dict[int, LengthEstimate], requests: Sequence[TraceRequest]) -> float:
    from scipy import stats

    idx = sorted(estimates)
    tau = stats.kendalltau([estimates[i].p50 for i in idx],
                           [requests[i].output_tokens for i in idx]).statistic
    return float(tau)
