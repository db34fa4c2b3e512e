"""K-fold evaluation of the length estimator against two baselines, per model.

Folds split by *prompt* (grouped by prompt text, so duplicate texts with different ids also
stay together): for a test fold, the history is built from every file's records of the
training-fold prompts only, so nothing about a test prompt, from any model, is visible. All
models' lengths for training prompts are used (that is the cross-model warm-up the service
also does).

Metrics per model, each averaged over folds: MAE (tokens) of the point estimate (ALISE: p50),
Kendall tau-b and Spearman rho between predicted and true lengths (0 for a constant
prediction), bucket accuracy (ALISE: the most probable bucket; baselines: the bucket of the
point estimate), and p90 coverage (share of true lengths <= the predicted p90).

Leave-one-generator-out (``holdout``): the history holds only the *other* models' lengths of
the training-fold prompts, and only the held-out model's lengths of the test-fold prompts are
scored, so neither the test prompts nor the held-out model's answers to anything are seen:
a new model being served with other models' history. Its predictions use the pooled fit and
the other models' mean log-length (the deployment does not know the new model's scale yet),
and the baselines see the same observations.

Baselines: ``mean`` predicts the model's training mean (p90: training 90th percentile);
``knn10`` the similarity-weighted mean of the model's lengths on the 10 most similar training
prompts (p90: their weighted 90th percentile).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from alise.predictor.datasets import PromptRecord
from alise.predictor.estimator import EstimatorConfig, LengthEstimator
from alise.predictor.fitting import refit
from alise.predictor.history import History, prompt_key
from alise.predictor.index import VectorIndex

logger = logging.getLogger(__name__)

METHODS = ("alise", "mean", "knn10")
METRICS = ("mae", "kendall_tau", "spearman_rho", "bucket_acc", "p90_coverage")


@dataclass(frozen=True)
class Corpus:
    """Unique prompts (embedded once) and every (prompt, model, output tokens) observation."""

    texts: list[str]
    vectors: np.ndarray
    prompt_tokens: np.ndarray
    obs_prompt: np.ndarray
    obs_model: list[str]
    obs_tokens: np.ndarray


def build_corpus(records: Sequence[PromptRecord], encoder, counter) -> Corpus:
    """Embeds each unique prompt once and counts output tokens with ``counter``."""
    with_output = [r for r in records if r.output is not None]
    if not with_output:
        raise ValueError("no records with outputs to evaluate on")
    rows: dict[str, int] = {}
    texts: list[str] = []
    for r in with_output:
        if rows.setdefault(prompt_key(r.prompt), len(texts)) == len(texts):
            texts.append(r.prompt)
    encoded = encoder.encode(texts)
    return Corpus(
        texts=texts, vectors=encoded.vectors,
        prompt_tokens=np.asarray(encoded.num_tokens, np.int32),
        obs_prompt=np.array([rows[prompt_key(r.prompt)] for r in with_output]),
        obs_model=[r.model for r in with_output],
        obs_tokens=np.asarray(counter.count([r.output for r in with_output]), np.int32),
    )


def _bucket(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, values, side="right")


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    cdf = np.cumsum(w, axis=1) / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    idx = np.minimum((cdf < q).sum(axis=1), values.shape[1] - 1)
    return v[np.arange(len(v)), idx]


def _metrics(pred: np.ndarray, p90: np.ndarray, bucket: np.ndarray, y: np.ndarray,
             edges: np.ndarray) -> dict[str, float]:
    constant = np.ptp(pred) == 0
    tau = 0.0 if constant else stats.kendalltau(pred, y).statistic
    rho = 0.0 if constant else stats.spearmanr(pred, y).statistic
    return {
        "mae": float(np.abs(pred - y).mean()),
        "kendall_tau": float(tau), "spearman_rho": float(rho),
        "bucket_acc": float((bucket == _bucket(y, edges)).mean()),
        "p90_coverage": float((y <= p90).mean()),
    }


def _baselines(train_vecs, train_y, test_vecs, edges) -> dict[str, tuple]:
    n = len(test_vecs)
    mean = np.full(n, train_y.mean())
    p90 = np.full(n, np.percentile(train_y, 90))
    sims = test_vecs @ train_vecs.T
    k = min(10, len(train_y))
    nb = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    w = np.maximum(np.take_along_axis(sims, nb, axis=1), 1e-6).astype(np.float64)
    knn = (w * train_y[nb]).sum(axis=1) / w.sum(axis=1)
    knn_p90 = _weighted_quantile(train_y[nb].astype(np.float64), w, 0.9)
    return {"mean": (mean, p90, _bucket(mean, edges)), "knn10": (knn, knn_p90, _bucket(knn, edges))}


def _run_fold(corpus: Corpus, train: np.ndarray, config: EstimatorConfig,
              models: list[str], holdout: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    edges = np.asarray(config.bucket_edges, np.float64)
    history = History(VectorIndex(corpus.vectors.shape[1]))
    train_rows = np.flatnonzero(train)
    history.add_prompts([corpus.texts[r] for r in train_rows], corpus.vectors[train_rows],
                        corpus.prompt_tokens[train_rows])
    new_row = np.full(len(train), -1)
    new_row[train_rows] = np.arange(len(train_rows))
    obs_model = np.asarray(corpus.obs_model)
    visible = obs_model != holdout if holdout is not None else np.ones(len(obs_model), bool)
    obs_train = train[corpus.obs_prompt] & visible
    history.add_observations(new_row[corpus.obs_prompt[obs_train]],
                             [m for m, t in zip(corpus.obs_model, obs_train, strict=True) if t],
                             corpus.obs_tokens[obs_train])
    estimator = LengthEstimator(history, config)
    refit(estimator)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model in models:
        is_model = obs_model == model
        test_sel = is_model & ~train[corpus.obs_prompt]
        train_sel = obs_train if holdout is not None else is_model & obs_train
        if not test_sel.any() or not train_sel.any():
            continue
        rows = corpus.obs_prompt[test_sel]
        y = corpus.obs_tokens[test_sel].astype(np.float64)
        est = estimator.predict(corpus.vectors[rows], [corpus.texts[r] for r in rows],
                                corpus.prompt_tokens[rows], model)
        result = {"alise": _metrics(est.p50, est.p90, est.bucket_probs.argmax(axis=1), y, edges)}
        base = _baselines(corpus.vectors[corpus.obs_prompt[train_sel]],
                          corpus.obs_tokens[train_sel].astype(np.float64), corpus.vectors[rows], edges)
        for name, (pred, p90, bucket) in base.items():
            result[name] = _metrics(pred, p90, bucket, y, edges)
        out[model] = result
    return out


def evaluate(corpus: Corpus, *, num_folds: int = 5, seed: int = 0,
             config: EstimatorConfig | None = None, holdout: Sequence[str] = ()) -> dict:
    """Returns ``{"models": {model: {method: {metric: value}}}, "average": {method: ...}}``.

    With ``holdout`` (model names), each named model is left out in turn (see the module
    docstring) and the table has one row per held-out model."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    config = config or EstimatorConfig()
    fold_of = np.random.default_rng(seed).permutation(len(corpus.texts)) % num_folds
    models = sorted(set(corpus.obs_model))
    unknown = sorted(set(holdout) - set(models))
    if unknown:
        raise ValueError(f"--holdout-generator {', '.join(unknown)}: not a model of the data "
                         f"({', '.join(models)})")
    if holdout and len(models) < 2:
        raise ValueError("leave-one-generator-out needs data of at least two models")
    runs = [(m, [m]) for m in holdout] if holdout else [(None, models)]
    per_fold: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for held_out, scored in runs:
        for fold in range(num_folds):
            logger.info("fold %d/%d%s", fold + 1, num_folds, f" (holding out {held_out})" if held_out else "")
            for model, by_method in _run_fold(corpus, fold_of != fold, config, scored, held_out).items():
                for method, metrics in by_method.items():
                    per_fold[model][method].append(metrics)
    table = {
        model: {method: {k: float(np.mean([f[k] for f in folds])) for k in METRICS}
                for method, folds in by_method.items()}
        for model, by_method in per_fold.items()
    }
    average = {
        method: {k: float(np.mean([table[m][method][k] for m in table])) for k in METRICS}
        for method in METHODS
    }
    for method in METHODS:
        ratios = [table[m][method]["mae"] / table[m]["mean"]["mae"] for m in table]
        average[method]["mae_vs_mean"] = float(np.mean(ratios))
    return {"num_folds": num_folds, "seed": seed, "num_prompts": len(corpus.texts),
            "holdout": list(holdout), "models": table, "average": average}


def format_table(report: dict) -> str:
    header = f"{'model':<28} {'method':<6} {'MAE':>8} {'vs mean':>8} {'tau':>7} {'rho':>7} {'bucket':>7} {'p90cov':>7}"
    lines = [header, "-" * len(header)]

    def row(name: str, method: str, m: dict, base_mae: float, ratio: float | None = None) -> str:
        r = m["mae"] / base_mae if ratio is None else ratio
        return (f"{name:<28} {method:<6} {m['mae']:8.1f} {(r - 1) * 100:+7.1f}% {m['kendall_tau']:7.3f} "
                f"{m['spearman_rho']:7.3f} {m['bucket_acc']:7.3f} {m['p90_coverage']:7.3f}")

    for model, by_method in report["models"].items():
        for method in METHODS:
            lines.append(row(model, method, by_method[method], by_method["mean"]["mae"]))
    lines.append("-" * len(header))
    avg = report["average"]
    for method in METHODS:
        lines.append(row(f"AVERAGE ({len(report['models'])} models)", method, avg[method],
                         avg["mean"]["mae"], avg[method]["mae_vs_mean"]))
    lines.append("('vs mean' on the AVERAGE rows is the mean of per-model MAE ratios)")
    return "\n".join(lines)
