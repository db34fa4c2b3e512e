"""The predictor's memory: unique prompts (vectors in the index) and observed output lengths.

A *prompt* is stored once, keyed by the SHA-1 of its whole text, with its vector at the same
row of the :class:`VectorIndex`. The stored text may be shorter than the prompt (the service
keeps only what the encoder sees of it); the key is always of the whole text, so an exact
repeat is still recognised. An *observation* is one (prompt row, model, output tokens) triple; a
prompt answered by twelve models has one row and twelve observations, so nearest-neighbour
search returns distinct prompts and cross-model statistics come for free.

Invariants: ``len(index) == len(texts) == len(keys) == len(prompt_tokens)``; every
observation's prompt row is ``< len(index)``; model ids index :attr:`models`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from alise.predictor.index import VectorIndex


def prompt_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class _Growable:
    """An append-only 1-D numpy array with amortised O(1) appends."""

    def __init__(self, dtype, values: np.ndarray | None = None) -> None:
        self._data = np.zeros(1024, dtype) if values is None else np.array(values, dtype)
        self._n = 0 if values is None else len(values)

    def extend(self, values: np.ndarray) -> None:
        needed = self._n + len(values)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), self._data.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : needed] = values
        self._n = needed

    def view(self) -> np.ndarray:
        return self._data[: self._n]


class History:
    """Prompts, their vectors, and the output lengths models gave them."""

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.texts: list[str] = []
        self.keys: list[str] = []
        self._prompt_tokens = _Growable(np.int32)
        self._rows_by_key: dict[str, int] = {}
        self.models: list[str] = []
        self._model_ids: dict[str, int] = {}
        self._obs_row = _Growable(np.int64)
        self._obs_model = _Growable(np.int32)
        self._obs_tokens = _Growable(np.int32)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def num_prompts(self) -> int:
        return len(self.texts)

    @property
    def num_observations(self) -> int:
        return len(self._obs_row.view())

    @property
    def prompt_tokens(self) -> np.ndarray:
        return self._prompt_tokens.view()

    def observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt rows, model ids, output tokens), one entry per observation."""
        return self._obs_row.view(), self._obs_model.view(), self._obs_tokens.view()

    def model_id(self, model: str, *, create: bool = False) -> int | None:
        if model not in self._model_ids:
            if not create:
                return None
            self._model_ids[model] = len(self.models)
            self.models.append(model)
        return self._model_ids[model]

    def row_of(self, text: str) -> int | None:
        return self._rows_by_key.get(prompt_key(text))

    def row_of_key(self, key: str) -> int | None:
        return self._rows_by_key.get(key)

    def add_prompts(
        self, texts: Sequence[str], vectors: np.ndarray, prompt_tokens: Sequence[int],
        keys: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Rows of ``texts``, adding the ones not yet stored (duplicates are stored once).
        ``keys`` (default: each text's :func:`prompt_key`) identify the prompts; give them when
        ``texts`` are cut-down versions of the prompts."""
        keys = [prompt_key(t) for t in texts] if keys is None else list(keys)
        if len(keys) != len(texts):
            raise ValueError("texts and keys must have the same length")
        rows = np.empty(len(texts), np.int64)
        new_idx: list[int] = []
        pending: dict[str, int] = {}
        for i, key in enumerate(keys):
            row = self._rows_by_key.get(key, pending.get(key))
            if row is None:
                row = len(self.texts) + len(new_idx)
                pending[key] = row
                new_idx.append(i)
            rows[i] = row
        if new_idx:
            self.index.add(np.asarray(vectors)[new_idx])
            for i in new_idx:
                self.texts.append(texts[i])
                self.keys.append(keys[i])
            self._prompt_tokens.extend(np.asarray(prompt_tokens, np.int32)[new_idx])
            self._rows_by_key.update(pending)
        return rows

    def add_observations(
        self, rows: np.ndarray, models: Sequence[str], output_tokens: Sequence[int]
    ) -> None:
        if not len(rows) == len(models) == len(output_tokens):
            raise ValueError("rows, models and output_tokens must have the same length")
        if len(rows) and (np.min(rows) < 0 or np.max(rows) >= self.num_prompts):
            raise ValueError("observation refers to an unknown prompt row")
        if any(t < 0 for t in output_tokens):
            raise ValueError("output_tokens must be >= 0")
        ids = [self.model_id(m, create=True) for m in models]
        self._obs_row.extend(np.asarray(rows, np.int64))
        self._obs_model.extend(np.asarray(ids, np.int32))
        self._obs_tokens.extend(np.asarray(output_tokens, np.int32))

    def prefix(self, num_observations: int) -> History:
        """This history as it would be with only its first ``num_observations`` observations:
        the same prompts, index and models (shared, not copied), the observations cut. For a
        refit's validation; valid while this history gains no prompt (use it on its thread)."""
        view = History(self.index)
        view.texts, view.keys, view._rows_by_key = self.texts, self.keys, self._rows_by_key
        view._prompt_tokens = self._prompt_tokens
        view.models, view._model_ids = self.models, self._model_ids
        rows, model_ids, tokens = self.observations()
        view._obs_row = _Growable(np.int64, rows[:num_observations])
        view._obs_model = _Growable(np.int32, model_ids[:num_observations])
        view._obs_tokens = _Growable(np.int32, tokens[:num_observations])
        return view

    # -- persistence (see snapshot.py) ----------------------------------------------------

    @classmethod
    def restore(
        cls,
        index: VectorIndex,
        texts: list[str],
        prompt_tokens: np.ndarray,
        models: list[str],
        obs: tuple[np.ndarray, np.ndarray, np.ndarray],
        keys: list[str] | None = None,
    ) -> History:
        keys = [prompt_key(t) for t in texts] if keys is None else list(keys)
        if not len(index) == len(texts) == len(keys) == len(prompt_tokens):
            raise ValueError(
                f"index has {len(index)} rows but {len(texts)} texts and "
                f"{len(keys)} keys and {len(prompt_tokens)} prompt lengths were stored"
            )
        history = cls(index)
        history.texts = list(texts)
        history._prompt_tokens = _Growable(np.int32, prompt_tokens)
        history.keys = keys
        history._rows_by_key = {k: i for i, k in enumerate(keys)}
        for m in models:
            history.model_id(m, create=True)
        rows, model_ids, tokens = obs
        if len(rows) and (rows.max() >= len(texts) or model_ids.max() >= len(models)):
            raise ValueError("stored observations refer to unknown prompts or models")
        history._obs_row = _Growable(np.int64, rows)
        history._obs_model = _Growable(np.int32, model_ids)
        history._obs_tokens = _Growable(np.int32, tokens)
        return history
