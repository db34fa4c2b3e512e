"""The length estimator: neighbours + learned heads + a stacker, per serving model.

Model (all in ``z = log1p(output tokens)`` space). For each stored prompt ``p`` and model
``m`` with offset ``o_m`` (the model's mean log-length), the *prompt effect* ``e_p`` is the
mean of ``z - o_m`` over every observation of ``p`` by any model: how much longer than usual
this prompt makes models talk. Other models' answers are therefore evidence about a prompt
even before the served model has seen it; that is how a new deployment warms up from other
models' histories.

For a query prompt and target model ``m`` the features are:

- ``kernel``: kernel ridge head on the embedding, predicting ``e``;
- ``tfidf``: ridge head on word TF-IDF, predicting ``e``;
- ``knn_effect`` / ``knn_target``: similarity-weighted means over the nearest stored prompts
  of ``e`` and of ``m``'s own residual (``e`` where ``m`` never answered that prompt);
- ``deviation``: a linear head for how ``m`` departs from the cross-model effect;
- ``prompt_len``: ``log1p`` of the prompt's encoder tokens.

A prompt that continues a conversation may come with the output tokens of the conversation's
earlier answers; their deviation from the model's mean, shrunk by how many there are and by
how much the model's conversations are seen to differ (learned from the pairs fed to
:meth:`observe_context`), is added to the estimate (``context.py``). Without them the
estimate is the prompt's alone.

A per-model :class:`Stacker` (pooled across models for models with little history) turns
them into the point estimate, fitted for MAE. When the top similarity is below
``head_threshold`` the neighbour features are noise, so a second stacker without them is
used (source ``"head"``); a prompt whose exact text is stored with the target model's own
answers uses those (``"knn"``: matched by the text's key, not by cosine, so it does not depend
on float rounding of the vectors); before any fit, a running mean (``"prior"``). For a model
with no observations yet, its scale is unknown: the spread is widened by the known models'
scales (``Spread.widened``), so its p90 still covers about 90 %.

Threading: ``fitting.refit`` reads a consistent prefix of the history and builds a new immutable
:class:`_Fitted`, swapped in by one reference assignment, so it may run in a worker thread
while :meth:`sync` and :meth:`predict` run on the owning thread. Kernel, TF-IDF and LOO
neighbour features at fit time use at most ``max_head_samples`` of the most recent prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from alise.predictor.config import EstimatorConfig
from alise.predictor.context import ContextMoments, context_shift
from alise.predictor.heads import KernelHead, LinearHead, TfidfHead
from alise.predictor.history import History, prompt_key
from alise.predictor.stacker import Spread, Stacker

FEATURES = ("kernel", "tfidf", "knn_effect", "knn_target", "deviation", "prompt_len")
HEAD_FEATURES = (0, 1, 4, 5)
_DEFAULT_LOG_LEN = float(np.log1p(128))


@dataclass
class Estimates:
    """Per prompt: tokens (mean, p50, p90), bucket probabilities, source, top similarity."""

    mean: np.ndarray
    p50: np.ndarray
    p90: np.ndarray
    bucket_probs: np.ndarray
    source: list[str]
    top_similarity: np.ndarray


@dataclass
class _ModelFit:
    full: Stacker
    head: Stacker
    deviation: LinearHead | None


@dataclass
class _Fitted:
    kernel: KernelHead
    tfidf: TfidfHead
    models: dict[int, _ModelFit]
    pooled: _ModelFit
    num_samples: int
    #: The history's observations when the fit read it: the ones after are unseen by it.
    num_observations: int = 0
    fitted_at: float = field(default_factory=time.time)


def _weights(sims: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    return np.where(valid, np.exp((np.where(valid, sims, 1.0) - 1.0) / temperature), 0.0)


def _weighted(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    total = w.sum(axis=1)
    return np.where(total > 0, (w * values).sum(axis=1) / np.maximum(total, 1e-30), 0.0)


class LengthEstimator:
    """Fits on a :class:`History` and predicts output-length distributions for one model."""

    def __init__(self, history: History, config: EstimatorConfig | None = None) -> None:
        self.history = history
        self.config = config or EstimatorConfig()
        self._fitted: _Fitted | None = None
        self._num_synced = 0
        self._eff_sum = np.zeros(0)
        self._eff_cnt = np.zeros(0)
        self._model_sum = np.zeros(0)
        self._model_cnt = np.zeros(0)
        self._res_sum: dict[int, np.ndarray] = {}
        self._res_cnt: dict[int, np.ndarray] = {}
        self._context: dict[str, ContextMoments] = {}
        self.sync()

    @property
    def fitted_at(self) -> float:
        return self._fitted.fitted_at if self._fitted else 0.0

    @property
    def num_fit_samples(self) -> int:
        return self._fitted.num_samples if self._fitted else 0

    # -- live statistics ---------------------------------------------------------------

    def _grow(self, arr: np.ndarray, size: int) -> np.ndarray:
        return arr if len(arr) >= size else np.concatenate([arr, np.zeros(size - len(arr))])

    def offset(self, model_id: int | None) -> float:
        """Mean log-length of a model, shrunk toward all models' mean when it has few."""
        total = self._model_cnt.sum()
        overall = self._model_sum.sum() / total if total else _DEFAULT_LOG_LEN
        if model_id is None or model_id >= len(self._model_cnt):
            return float(overall)
        prior = float(self.config.min_model_observations)
        return float((self._model_sum[model_id] + prior * overall)
                     / (self._model_cnt[model_id] + prior))

    def _offset_deviations(self) -> np.ndarray:
        """Each model's mean log-length less :meth:`offset`'s overall mean (the offset an
        unknown model gets), over the models with observations."""
        seen = np.flatnonzero(self._model_cnt > 0)
        if len(seen) < 2:
            return np.zeros(0)
        return self._model_sum[seen] / self._model_cnt[seen] - self.offset(None)

    def sync(self) -> None:
        """Folds observations added to the history since the last call into the live
        neighbour statistics (cheap: only the new ones)."""
        rows, model_ids, tokens = self.history.observations()
        new = slice(self._num_synced, len(rows))
        rows, model_ids, ly = rows[new], model_ids[new], np.log1p(tokens[new].astype(np.float64))
        num_prompts, num_models = self.history.num_prompts, len(self.history.models)
        self._model_sum = self._grow(self._model_sum, num_models)
        self._model_cnt = self._grow(self._model_cnt, num_models)
        np.add.at(self._model_sum, model_ids, ly)
        np.add.at(self._model_cnt, model_ids, 1.0)
        offsets = np.array([self.offset(m) for m in range(num_models)])
        res = ly - offsets[model_ids] if len(ly) else ly
        self._eff_sum = self._grow(self._eff_sum, num_prompts)
        self._eff_cnt = self._grow(self._eff_cnt, num_prompts)
        np.add.at(self._eff_sum, rows, res)
        np.add.at(self._eff_cnt, rows, 1.0)
        for m in np.unique(model_ids):
            sel = model_ids == m
            s = self._grow(self._res_sum.get(int(m), np.zeros(0)), num_prompts)
            c = self._grow(self._res_cnt.get(int(m), np.zeros(0)), num_prompts)
            np.add.at(s, rows[sel], res[sel])
            np.add.at(c, rows[sel], 1.0)
            self._res_sum[int(m)], self._res_cnt[int(m)] = s, c
        for m in set(self._res_sum) - set(np.unique(model_ids).tolist()):
            self._res_sum[m] = self._grow(self._res_sum[m], num_prompts)
            self._res_cnt[m] = self._grow(self._res_cnt[m], num_prompts)
        self._num_synced += len(ly)

    def observe_context(self, model: str, output_tokens: int, previous_output_tokens) -> None:
        """An answer of ``model`` to a prompt that came with its conversation's earlier answers:
        a pair ``k`` is learned from (not kept across restarts)."""
        self._context.setdefault(model, ContextMoments()).add(output_tokens, previous_output_tokens)

    def context_prior_turns(self, model: str) -> float:
        """The shift's ``k`` for ``model``: the configured one, else learned (inf: no shift)."""
        if self.config.context_prior_turns is not None:
            return self.config.context_prior_turns
        moments = self._context.get(model)
        return moments.prior_turns() if moments is not None else float("inf")

    # -- fitting (``alise.predictor.fitting`` builds what is installed) -----------------

    @property
    def fitted(self) -> _Fitted | None:
        return self._fitted

    def install(self, fitted: _Fitted) -> None:
        """Serves ``fitted`` (one reference assignment: safe beside :meth:`predict`)."""
        self._fitted = fitted

    # -- prediction ------------------------------------------------------------------------

    def _neighbour_features(self, vectors: np.ndarray, model_id: int | None):
        cfg = self.config
        sims, rows = self.history.index.search(vectors, cfg.num_neighbors)
        rows = np.where(rows < len(self._eff_cnt), rows, -1)  # a prompt added since the last sync
        safe = np.maximum(rows, 0)
        cnt = self._eff_cnt[safe] if len(self._eff_cnt) else np.zeros(rows.shape)
        valid = (rows >= 0) & (cnt > 0)
        eff = np.where(valid, self._eff_sum[safe] / np.maximum(cnt, 1), 0.0) if valid.any() \
            else np.zeros(rows.shape)
        if model_id in self._res_cnt:
            t_cnt = self._res_cnt[model_id][safe]
            t_mean = self._res_sum[model_id][safe] / np.maximum(t_cnt, 1)
            target = np.where(t_cnt > 0, t_mean, eff)
        else:
            target = eff
        w = _weights(sims, valid, cfg.knn_temperature)
        top = np.where(valid, sims, -1.0).max(axis=1) if rows.shape[1] else np.full(len(rows), -1.0)
        return _weighted(w, eff), _weighted(w, target), top

    def _exact(self, keys: Sequence[str], model_id: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(is the same prompt text stored with ``model_id``'s own answers, their mean residual)."""
        dup = np.zeros(len(keys), bool)
        dup_z = np.zeros(len(keys))
        if model_id not in self._res_cnt:
            return dup, dup_z
        counts, sums = self._res_cnt[model_id], self._res_sum[model_id]
        for i, key in enumerate(keys):
            row = self.history.row_of_key(key)
            if row is not None and row < len(counts) and counts[row] > 0:
                dup[i], dup_z[i] = True, sums[row] / counts[row]
        return dup, dup_z

    def predict(
        self, vectors: np.ndarray, texts: list[str], prompt_tokens: np.ndarray, model: str,
        keys: Sequence[str] | None = None, previous_output_tokens: Sequence[Sequence[int]] | None = None,
    ) -> Estimates:
        """Length distributions for ``texts`` (embedded as ``vectors``) under ``model``.
        ``keys`` are the texts' :func:`prompt_key` (computed here when not given): a prompt
        stored with the model's own answers is matched by its text, never by similarity.
        ``previous_output_tokens``: per text, the output tokens of the earlier answers of the
        conversation it continues (empty: none known)."""
        model_id = self.history.model_id(model)
        offset = self.offset(model_id)
        knn_eff, knn_target, top = self._neighbour_features(vectors, model_id)
        dup, dup_z = self._exact(keys if keys is not None else [prompt_key(t) for t in texts], model_id)
        fitted = self._fitted
        n = len(texts)
        if fitted is None:
            z = np.full(n, offset)
            spread = Spread.default()
            source = np.full(n, "prior", dtype=object)
        else:
            fit = fitted.models.get(model_id, fitted.pooled)
            deviation = fit.deviation.predict(vectors) if fit.deviation else np.zeros(n)
            feats = np.column_stack([
                fitted.kernel.predict(vectors), fitted.tfidf.predict(texts), knn_eff,
                knn_target if fit.deviation else knn_eff, deviation,
                np.log1p(np.asarray(prompt_tokens, np.float64)),
            ])
            use_full = top >= self.config.head_threshold
            z = np.where(use_full, fit.full.predict(feats, offset),
                         fit.head.predict(feats[:, HEAD_FEATURES], offset))
            spread = fit.full.spread
            if model_id is None:
                spread = spread.widened(self._offset_deviations())
            source = np.where(use_full, "blend", "head").astype(object)
        z = np.where(dup, offset + dup_z, z)
        source[dup] = "knn"
        if previous_output_tokens is not None:
            z = z + context_shift(previous_output_tokens, offset, self.context_prior_turns(model))
        edges = np.asarray(self.config.bucket_edges, np.float64)
        # NOTE: a residual quantile below zero can take a short estimate under zero tokens.
        return Estimates(
            mean=np.maximum(spread.mean(z), 0.0), p50=np.maximum(spread.quantile(z, 0.5), 0.0),
            p90=np.maximum(spread.quantile(z, 0.9), 0.0),
            bucket_probs=spread.bucket_probs(z, edges), source=list(source),
            top_similarity=np.maximum(top, -1.0),
        )
