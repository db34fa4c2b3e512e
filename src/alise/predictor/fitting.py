"""Fitting the estimator's heads and stackers on a history (blocking; run off the loop).

Every feature a stacker is trained on is a leave-one-*prompt*-out value: the heads' closed-form
LOO predictions, and neighbour means that skip the prompt itself. So a stacker learns how the
features behave on prompts they have not seen, which is the situation at prediction time.
See ``estimator.py`` for the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alise.predictor.estimator import HEAD_FEATURES, EstimatorConfig, LengthEstimator, _Fitted, _ModelFit
from alise.predictor.heads import KernelHead, LinearHead, TfidfHead
from alise.predictor.history import History
from alise.predictor.stacker import Stacker

#: Fewest prompts with observations before heads are worth fitting.
MIN_FIT_PROMPTS = 16
#: Fewest held-out observations a refit is judged on (fewer new ones: the refit is served).
MIN_VALIDATION_OBSERVATIONS = 32
#: Most held-out observations (the newest): the check runs on the event loop, like a Predict.
MAX_VALIDATION_OBSERVATIONS = 512
#: How much worse than the serving fit a refit may validate and still replace it: this
#: fraction of the serving fit's error, or two standard errors of the paired difference,
#: whichever is more (a difference within the noise of the held-out sample is no verdict).
VALIDATION_TOLERANCE = 0.01


def _loo_neighbours(vectors: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour indexes, weights) among ``vectors`` themselves, each excluding itself."""
    sims = vectors.astype(np.float32) @ vectors.T.astype(np.float32)
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(vectors) - 1)
    nb = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    nb_sims = np.take_along_axis(sims, nb, axis=1).astype(np.float64)
    return nb, np.exp((nb_sims - 1.0) / temperature)


def _wmean(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    return (w * values).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-30)


def _fit_stackers(feats: np.ndarray, ly: np.ndarray, offsets: np.ndarray, dev) -> _ModelFit:
    full, head = Stacker(), Stacker()
    full.fit(feats, ly, offsets)
    head.fit(feats[:, HEAD_FEATURES], ly, offsets)
    return _ModelFit(full=full, head=head, deviation=dev)


def fit_estimator(history: History, config: EstimatorConfig) -> _Fitted | None:
    rows, model_ids, tokens = (a.copy() for a in history.observations())
    num_prompts = history.num_prompts
    if len(rows) == 0:
        return None
    ly = np.log1p(tokens.astype(np.float64))
    num_models = int(model_ids.max()) + 1
    offsets = np.bincount(model_ids, ly, num_models) / np.maximum(np.bincount(model_ids, None, num_models), 1)
    res = ly - offsets[model_ids]
    cnt = np.bincount(rows, None, num_prompts)
    eff = np.bincount(rows, res, num_prompts) / np.maximum(cnt, 1)
    anchors = np.flatnonzero(cnt > 0)[-config.max_head_samples :]
    if len(anchors) < MIN_FIT_PROMPTS:
        return None
    position = np.full(num_prompts, -1)
    position[anchors] = np.arange(len(anchors))
    vectors = np.asarray(history.index.vectors[anchors])
    texts = [history.texts[r] for r in anchors]
    eff_a = eff[anchors]

    kernel = KernelHead(config.kernel_temperature, config.kernel_lambda)
    tfidf = TfidfHead(config.tfidf_lambda)
    kernel_loo = kernel.fit(vectors, eff_a)
    tfidf_loo = tfidf.fit(texts, eff_a)
    nb, w = _loo_neighbours(vectors, config.num_neighbors, config.knn_temperature)
    knn_eff = _wmean(w, eff_a[nb])
    prompt_len = np.log1p(history.prompt_tokens[anchors].astype(np.float64))
    base = np.column_stack([kernel_loo, tfidf_loo, knn_eff, knn_eff, np.zeros(len(anchors)), prompt_len])

    in_anchors = position[rows] >= 0
    pos_all = position[rows[in_anchors]]
    pooled = _fit_stackers(base[pos_all], ly[in_anchors], offsets[model_ids[in_anchors]], None)
    models: dict[int, _ModelFit] = {}
    for m in range(num_models):
        sel = in_anchors & (model_ids == m)
        if sel.sum() < config.min_model_observations:
            continue
        pos = position[rows[sel]]
        own_cnt = np.bincount(pos, None, len(anchors))
        own = np.bincount(pos, res[sel], len(anchors)) / np.maximum(own_cnt, 1)
        target = np.where(own_cnt > 0, own, eff_a)
        deviation = LinearHead(config.deviation_lambda)
        dev_loo = deviation.fit(vectors[pos], res[sel] - eff_a[pos])
        feats = base[pos].copy()
        feats[:, 3] = _wmean(w, target[nb])[pos]
        feats[:, 4] = dev_loo
        models[m] = _fit_stackers(feats, ly[sel], np.full(sel.sum(), offsets[m]), deviation)
    return _Fitted(kernel=kernel, tfidf=tfidf, models=models, pooled=pooled,
                   num_samples=int(in_anchors.sum()), num_observations=len(rows))


@dataclass(frozen=True)
class Validation:
    """A refit judged against the serving fit on the newest observations, which neither saw:
    the serving fit is older than them, the trial fit is the refit without them."""

    num_held_out: int
    serving_error: float    # mean |log1p(p50) - log1p(output tokens)|
    candidate_error: float
    #: Standard error of the mean per-observation difference (candidate minus serving).
    difference_se: float = 0.0

    @property
    def accepted(self) -> bool:
        margin = max(VALIDATION_TOLERANCE * self.serving_error, 2.0 * self.difference_se)
        return self.candidate_error - self.serving_error <= margin


def holdout_start(history: History, serving: _Fitted) -> int | None:
    """Where the held-out observations start: the newer half of those the serving fit never
    saw (at most ``MAX_VALIDATION_OBSERVATIONS``), so the trial fit learns from the older half;
    None when too few are new to judge."""
    unseen = history.num_observations - serving.num_observations
    held = min(unseen // 2, MAX_VALIDATION_OBSERVATIONS)
    if held < MIN_VALIDATION_OBSERVATIONS:
        return None
    return history.num_observations - held


def trial_fit(history: History, start: int, config: EstimatorConfig) -> tuple[_Fitted | None, LengthEstimator]:
    """The fit without observations ``start:`` and an estimator whose statistics are the
    history's before ``start`` (blocking: run off the loop, like any fit)."""
    prefix = history.prefix(start)
    return fit_estimator(prefix, config), LengthEstimator(prefix, config)


def validate_refit(history: History, estimator: LengthEstimator, start: int, end: int,
                   serving: _Fitted, trial: _Fitted) -> Validation:
    """Both fits predict observations ``start:end`` through ``estimator`` (``trial_fit``'s: the
    same neighbours and statistics for both, so only the fits differ). Runs where the
    history's writer runs (it searches the index)."""
    rows, model_ids, tokens = (a[start:end] for a in history.observations())
    truth = np.log1p(tokens.astype(np.float64))
    errors = []
    for fitted in (serving, trial):
        estimator.install(fitted)
        err = np.zeros(len(rows))
        for m in np.unique(model_ids):
            sel = model_ids == m
            r = rows[sel]
            est = estimator.predict(history.index.vectors[r], [history.texts[i] for i in r],
                                    history.prompt_tokens[r], history.models[m],
                                    keys=[history.keys[i] for i in r])
            err[sel] = np.abs(np.log1p(est.p50) - truth[sel])
        errors.append(err)
    diff = errors[1] - errors[0]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return Validation(len(rows), float(errors[0].mean()), float(errors[1].mean()), se)


def refit(estimator: LengthEstimator) -> bool:
    """Refits ``estimator``'s heads and stackers on its history and serves them; False when the
    history holds too little."""
    fitted = fit_estimator(estimator.history, estimator.config)
    if fitted is None:
        return False
    estimator.install(fitted)
    return True
