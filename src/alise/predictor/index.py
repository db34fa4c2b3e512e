"""Vector index over prompt embeddings: exact while small, IVF once large.

Rows are dense and permanent: the i-th vector added has row ``i`` for the life of the index
(and across snapshots), so callers keep per-row metadata in plain arrays beside it.

Below ``ivf_threshold`` rows the index is an exact ``IndexFlatIP`` (cosine similarity, since
vectors are unit norm). When an add crosses the threshold, the index migrates: an
``IndexIVFFlat`` is trained on a sample of the stored vectors and every vector is re-added.
It is retrained again each time the row count grows ``retrain_growth`` times past the last
training, so the coarse quantizer keeps fitting the data. The float32 vectors are kept beside
the faiss index (they are the source of truth for migration and for the learned heads).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

FLAT = "flat"
IVF = "ivf"


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must have shape (n, {dim}), got {vectors.shape}")
    return vectors


class VectorIndex:
    """Inner-product search over unit vectors with automatic flat -> IVF migration."""

    def __init__(
        self,
        dim: int,
        *,
        ivf_threshold: int = 50_000,
        nprobe: int = 16,
        retrain_growth: float = 4.0,
        seed: int = 0,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        if ivf_threshold < 1:
            raise ValueError(f"ivf_threshold must be >= 1, got {ivf_threshold}")
        self.dim = dim
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self.retrain_growth = retrain_growth
        self._seed = seed
        self._vectors = np.zeros((0, dim), np.float32)
        self._num_rows = 0
        self._trained_at = 0
        self._index: faiss.Index = faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        return self._num_rows

    @property
    def index_type(self) -> str:
        return IVF if isinstance(self._index, faiss.IndexIVF) else FLAT

    @property
    def vectors(self) -> np.ndarray:
        """All stored vectors, row-aligned (a read-only view)."""
        view = self._vectors[: self._num_rows]
        view.flags.writeable = False
        return view

    def _reserve(self, extra: int) -> None:
        needed = self._num_rows + extra
        if needed > len(self._vectors):
            # 1.25x growth: at 1M rows the slack is ~0.4 GB, not a second full copy.
            capacity = max(needed, int(1.25 * len(self._vectors)), 1024)
            grown = np.zeros((capacity, self.dim), np.float32)
            grown[: self._num_rows] = self._vectors[: self._num_rows]
            self._vectors = grown

    def add(self, vectors: np.ndarray) -> np.ndarray:
        """Appends vectors; returns their rows. May migrate or retrain the index."""
        vectors = _as_matrix(vectors, self.dim)
        first = self._num_rows
        self._reserve(len(vectors))
        self._vectors[first : first + len(vectors)] = vectors
        self._num_rows += len(vectors)
        n = self._num_rows
        if n >= self.ivf_threshold and (
            self.index_type == FLAT or n >= self.retrain_growth * self._trained_at
        ):
            self._build_ivf()
        else:
            self._index.add(vectors)
        return np.arange(first, n, dtype=np.int64)

    def _build_ivf(self) -> None:
        n = self._num_rows
        # ~4 sqrt(n) lists, but at least 39 training points per list (faiss's minimum).
        nlist = max(1, min(int(2 * math.sqrt(n)), n // 39, 2048))
        rng = np.random.default_rng(self._seed)
        sample_size = min(n, 40 * nlist)
        sample = self._vectors[np.sort(rng.choice(n, sample_size, replace=False))]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self._seed
        index.train(sample)
        index.add(self._vectors[:n])
        index.nprobe = self.nprobe
        self._index = index
        self._trained_at = n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (similarities, rows) per query; missing slots are (-inf, -1)."""
        queries = _as_matrix(queries, self.dim)
        if self._num_rows == 0 or k <= 0 or len(queries) == 0:
            shape = (len(queries), max(k, 0))
            return np.full(shape, -np.inf, np.float32), np.full(shape, -1, np.int64)
        sims, rows = self._index.search(queries, k)
        sims = np.where(rows < 0, -np.inf, sims).astype(np.float32)
        return sims, rows

    # -- persistence -------------------------------------------------------------------

    def state(self) -> tuple[np.ndarray, bytes, int]:
        """(vectors, serialized faiss index, rows at last IVF training) for a snapshot.

        The vectors are a read-only view of the first rows, not a copy: rows are never
        rewritten, so the view stays valid while later adds go on (from another thread too).
        A flat index is rebuilt from the vectors on load, so its blob is empty; an IVF index
        is serialized (its trained quantizer is not cheap to redo), which must not overlap
        an ``add``."""
        blob = faiss.serialize_index(self._index).tobytes() if self.index_type == IVF else b""
        return self.vectors, blob, self._trained_at

    @classmethod
    def from_state(
        cls, vectors: np.ndarray, blob: bytes, trained_at: int, **kwargs
    ) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = cls(vectors.shape[1], **kwargs)
        if not blob:
            faiss_index = faiss.IndexFlatIP(index.dim)
            faiss_index.add(vectors)
        else:
            faiss_index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        if faiss_index.d != index.dim or faiss_index.ntotal != len(vectors):
            raise ValueError(
                f"faiss index holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, "
                f"but {len(vectors)} of dim {index.dim} were stored beside it"
            )
        if isinstance(faiss_index, faiss.IndexIVF):
            faiss_index.nprobe = index.nprobe
        index._vectors = vectors.copy()
        index._num_rows = len(vectors)
        index._trained_at = trained_at
        index._index = faiss_index
        return index
