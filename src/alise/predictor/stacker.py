"""The stacker: combines head and neighbour features into one log-length, plus its spread.

Predictions live in ``z = log1p(tokens)`` space. The stacker is linear in its features,
``z = offset + F @ w + b``, but its weights are fitted to minimise the *absolute error in
tokens* of ``expm1(z)`` (a smoothed L1 loss, L-BFGS from the least-squares solution). So the
point estimate it returns is a conditional median, which is what minimises MAE; ranking
(Kendall tau) only depends on the order of ``z``.

Uncertainty comes from the stacker's own residuals ``r = log1p(y) - z`` on leave-one-out
features: their percentiles give p90, the mean, and the probability of each length bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

PERCENTILES = np.arange(1, 100, dtype=np.float64)
#: Largest log-length the optimiser evaluates (expm1(12) ~ 160k tokens) to avoid overflow.
_Z_MAX = 12.0


@dataclass(frozen=True)
class Spread:
    """Percentiles 1..99 of log-space residuals (sorted), shared by all predictions of a model."""

    residuals: np.ndarray

    @classmethod
    def from_residuals(cls, residuals: np.ndarray) -> Spread:
        if len(residuals) == 0:
            return cls.default()
        return cls(np.percentile(residuals, PERCENTILES))

    @classmethod
    def default(cls) -> Spread:
        # A wide log-normal (sigma 1) for when nothing has been learned yet.
        from scipy.stats import norm

        return cls(norm.ppf(PERCENTILES / 100.0))

    def widened(self, offsets: np.ndarray) -> Spread:
        """The spread of ``residual + offset`` with the offset drawn from ``offsets``: for a
        model whose scale is not known yet, the known models' scales (about their mean)."""
        if len(offsets) == 0:
            return self
        return Spread(np.percentile((self.residuals[:, None] + offsets[None, :]).ravel(), PERCENTILES))

    def quantile(self, z: np.ndarray, q: float) -> np.ndarray:
        return np.expm1(z + np.interp(q * 100.0, PERCENTILES, self.residuals))

    def mean(self, z: np.ndarray) -> np.ndarray:
        return np.expm1(z[:, None] + self.residuals[None, :]).mean(axis=1)

    def bucket_probs(self, z: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """P(length in each bucket ``[e_i, e_{i+1})``), with buckets below the first and
        above the last edge; rows sum to 1."""
        # cdf[i, j] = P(y < edges[j]) for prediction i, by interpolation on the residual grid.
        thresholds = np.log1p(edges)[None, :] - z[:, None]
        cdf = np.interp(thresholds, self.residuals, PERCENTILES / 100.0, left=0.0, right=1.0)
        full = np.concatenate([np.zeros((len(z), 1)), cdf, np.ones((len(z), 1))], axis=1)
        return np.diff(full, axis=1)


class Stacker:
    """Linear stacker in log space, trained for absolute error in tokens."""

    def __init__(self, l2: float = 1e-3) -> None:
        self.l2 = l2
        self.weights = np.zeros(0)
        self.bias = 0.0
        self.spread = Spread.default()

    def fit(self, features: np.ndarray, log_lengths: np.ndarray, offsets: np.ndarray) -> None:
        """``log_lengths = log1p(tokens)``; ``offsets`` is added to the linear part (the model's
        mean log-length)."""
        x = np.column_stack([features, np.ones(len(features))])
        target = log_lengths - offsets
        ls = np.linalg.solve(x.T @ x + self.l2 * np.eye(x.shape[1]), x.T @ target)
        tokens = np.expm1(log_lengths)
        scale = max(float(np.mean(np.abs(tokens - np.median(tokens)))), 1.0)

        def loss(v: np.ndarray) -> tuple[float, np.ndarray]:
            z = np.minimum(offsets + x @ v, _Z_MAX)
            err = (np.expm1(z) - tokens) / scale
            smooth = np.sqrt(err * err + 1e-2)
            grad_z = err / smooth * np.exp(z) / scale
            value = smooth.mean() + self.l2 * float(v[:-1] @ v[:-1])
            grad = x.T @ grad_z / len(z) + 2 * self.l2 * np.append(v[:-1], 0.0)
            return value, grad

        result = minimize(loss, ls, jac=True, method="L-BFGS-B", options={"maxiter": 200})
        v = result.x if np.all(np.isfinite(result.x)) else ls
        self.weights, self.bias = v[:-1], float(v[-1])
        self.spread = Spread.from_residuals(log_lengths - self.predict(features, offsets))

    def predict(self, features: np.ndarray, offsets: np.ndarray | float) -> np.ndarray:
        return np.minimum(offsets + features @ self.weights + self.bias, _Z_MAX)
