"""Learned heads: regressions from a prompt to its log output length, with LOO predictions.

All heads are closed-form ridge regressions, so each also returns exact leave-one-out (LOO)
predictions on its own training set for free. The stacker (``stacker.py``) is trained on those
LOO predictions, never on in-sample fits, so it learns how much to trust each head on prompts
the head has not seen.

- :class:`KernelHead`: kernel ridge on the unit embeddings with ``k(a, b) = exp((a.b - 1)/T)``
  (an RBF kernel on the sphere). This is the "small learned head on the embedding" of the
  paper's method; it measured better than an MLP of comparable cost on AlpacaEval.
- :class:`TfidfHead`: ridge on word uni+bigram TF-IDF features of the prompt text
  (scikit-learn's vectorizer); words like "list", "essay" or "one word" carry length
  information the sentence embedding blurs.
- :class:`LinearHead`: primal ridge on the embedding (used for a model's deviation from the
  cross-model prompt effect).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

#: Characters of a prompt the TF-IDF features look at (same bound as the encoder's pre-cut).
MAX_TEXT_CHARS = 8192


def _dual_ridge(gram: np.ndarray, y: np.ndarray, lam: float):
    """(alpha, y mean, LOO predictions) of ridge in dual form with an unpenalised intercept."""
    y_mean = float(y.mean())
    inv = np.linalg.inv(gram + lam * np.eye(len(y)))
    alpha = inv @ (y - y_mean)
    loo = y - alpha / np.diag(inv)
    return alpha, y_mean, loo


def _cut(text: str) -> str:
    return text[:MAX_TEXT_CHARS].lower()


def make_tfidf(min_df: int = 2, max_features: int = 100_000) -> TfidfVectorizer:
    """Word uni+bigram TF-IDF (sublinear tf, smoothed idf, L2 rows), vocabulary by min df."""
    return TfidfVectorizer(preprocessor=_cut, ngram_range=(1, 2), min_df=min_df,
                           max_features=max_features, sublinear_tf=True, dtype=np.float64)


class KernelHead:
    """Kernel ridge on unit embeddings with an exponential (spherical RBF) kernel."""

    def __init__(self, temperature: float = 0.5, lam: float = 1.0) -> None:
        self.temperature = temperature
        self.lam = lam

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
        k = a @ b.T
        k -= 1.0  # in place: the same values as exp((a @ b.T - 1) / T), no temporaries
        k /= self.temperature
        return np.exp(k, out=k)

    def fit(self, vectors: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Fits on ``vectors -> y``; returns LOO predictions."""
        # float64 once here, not per predict call (a 4096 x 384 cast cost ~0.2 ms a request).
        self._anchors = np.asarray(np.asarray(vectors, np.float32), np.float64)
        self._alpha, self._y_mean, loo = _dual_ridge(self._kernel(vectors, vectors), y, self.lam)
        return loo

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return self._kernel(vectors, self._anchors) @ self._alpha + self._y_mean


class TfidfHead:
    """Ridge (dual form) on TF-IDF features of the prompt texts."""

    def __init__(self, lam: float = 1.0, min_df: int = 2) -> None:
        self.lam = lam
        self.min_df = min_df

    def fit(self, texts: Sequence[str], y: np.ndarray) -> np.ndarray:
        self._vectorizer = make_tfidf(self.min_df)
        features = self._vectorizer.fit_transform(list(texts))
        gram = (features @ features.T).toarray()
        alpha, self._y_mean, loo = _dual_ridge(gram, y, self.lam)
        self._weights = features.T @ alpha  # primal weights: cheap prediction
        return loo

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectorizer.transform(list(texts)) @ self._weights + self._y_mean


class LinearHead:
    """Primal ridge with intercept on the embedding; LOO from the hat matrix diagonal."""

    def __init__(self, lam: float = 10.0) -> None:
        self.lam = lam

    def fit(self, vectors: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, np.float64)
        self._x_mean = x.mean(0)
        self._y_mean = float(y.mean())
        xc = x - self._x_mean
        inv = np.linalg.inv(xc.T @ xc + self.lam * np.eye(x.shape[1]))
        self._w = inv @ (xc.T @ (y - self._y_mean))
        fitted = xc @ self._w + self._y_mean
        hat = np.einsum("ij,jk,ik->i", xc, inv, xc) + 1.0 / len(y)
        return (fitted - hat * y) / (1.0 - hat)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, np.float64) - self._x_mean) @ self._w + self._y_mean
