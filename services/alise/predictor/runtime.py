"""The predictor's runtime (no gRPC): batching, online updates, refits and snapshots.

One writer: the history, the faiss index and the estimator's live statistics are mutated only
on the event loop (``observe``), and read there too (``predict``'s neighbour search). Only two
things leave the loop: embedding (``Encoder.encode_async``) and refitting
(``LengthEstimator.fit`` reads a consistent prefix of the append-only history and swaps its
result in by one assignment), so no lock is needed.

Predict calls that queue up while the encoder is busy are embedded together in its next call
(up to ``max_batch_prompts``), which is what makes 256 concurrent single-prompt requests cost
about one batch; an idle encoder starts at once (``batch_window_ms`` = 0, the default), so a
lone request pays no batching delay.

Observe reuses embeddings: a prompt already in the history needs none, and one that a recent
Predict embedded (the usual order: predict at admission, observe at completion) takes that
vector from a small LRU cache, so in steady state each prompt is encoded once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from alise.predictor.config import PredictorConfig
from alise.predictor.datasets import load_records
from alise.predictor.encoder import Encoder
from alise.predictor.estimator import Estimates, LengthEstimator
from alise.predictor.history import History, prompt_key
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import load_snapshot, save_snapshot

logger = logging.getLogger(__name__)
_MAX_REMEMBERED = 100_000
#: Embeddings of recently predicted prompts kept for their Observe (384 floats each: ~12 MB).
_MAX_CACHED_VECTORS = 8192


class ShuttingDown(RuntimeError):
    """The runtime is closing; pending and new predictions are refused."""


@dataclass
class PredictResult:
    estimates: Estimates
    truncated: list[int]


@dataclass
class _Pending:
    prompts: list[str]
    future: asyncio.Future


def bootstrap_history(history: History, encoder: Encoder, paths, tokenizer_path) -> int:
    """Adds every record with an output from ``paths`` (blocking); returns how many."""
    from alise.predictor.tokens import TokenCounter

    records = [r for p in paths for r in load_records(p) if r.output is not None]
    if not records:
        return 0
    texts = list(dict.fromkeys(r.prompt for r in records))
    encoded = encoder.encode(texts)
    rows = history.add_prompts(texts, encoded.vectors, encoded.num_tokens)
    row_of = dict(zip(texts, rows.tolist()))
    tokens = TokenCounter(tokenizer_path).count([r.output for r in records])
    history.add_observations(np.array([row_of[r.prompt] for r in records]),
                             [r.model for r in records], tokens)
    return len(records)


class PredictorRuntime:
    """Owns encoder, history and estimator; every public coroutine runs on one loop."""

    def __init__(self, config: PredictorConfig, encoder: Encoder, history: History) -> None:
        self.config = config
        self.encoder = encoder
        self.history = history
        self.estimator = LengthEstimator(history, config.estimator)
        self.num_predictions = 0
        self.num_observations = 0
        self._abs_error_sum = 0.0
        self._num_scored = 0
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._recent_vectors: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._since_refit = 0
        self._dirty = False
        self._refit_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def create(cls, config: PredictorConfig, encoder: Encoder | None = None) -> "PredictorRuntime":
        if encoder is None:
            encoder = await asyncio.to_thread(
                Encoder, config.encoder_path, num_threads=config.num_threads,
                max_seq_length=config.encoder_max_seq_length, int8=config.encoder_int8,
                backend=config.encoder_backend)
        kwargs = {"ivf_threshold": config.ivf_threshold}
        history = None
        if config.index_dir:
            history = load_snapshot(config.index_dir, encoder.name, encoder.dim, **kwargs)
        fresh = history is None
        history = history or History(VectorIndex(encoder.dim, **kwargs))
        if fresh and config.bootstrap:
            n = await asyncio.to_thread(bootstrap_history, history, encoder, config.bootstrap,
                                        config.tokenizer_path)
            logger.info("bootstrapped %d observations from %s", n, ", ".join(config.bootstrap))
        runtime = cls(config, encoder, history)
        await asyncio.to_thread(runtime.estimator.fit)
        if fresh and config.bootstrap and config.index_dir:
            runtime.snapshot()
        return runtime

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._batch_loop(), name="predictor-batches"),
                       asyncio.create_task(self._refit_loop(), name="predictor-refit")]
        if self.config.index_dir:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="predictor-snapshots"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("predictor is shutting down"))
        if self.config.index_dir and self._dirty:
            self.snapshot()

    # -- predict -------------------------------------------------------------------------

    async def predict(self, prompts: list[str]) -> PredictResult:
        """Validated prompts in, estimates out (batched with concurrent callers)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(list(prompts), future))
        self._wakeup.set()
        return await future

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if self.config.batch_window_ms > 0:
                await asyncio.sleep(self.config.batch_window_ms / 1000.0)
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0].prompts) <= self.config.max_batch_prompts):
                pending = self._queue.pop(0)
                if not pending.future.cancelled():
                    batch.append(pending)
                    size += len(pending.prompts)
            if not self._queue:
                self._wakeup.clear()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        prompts = [p for pending in batch for p in pending.prompts]
        try:
            encoded = await self.encoder.encode_async(prompts)
            estimates = self.estimator.predict(encoded.vectors, prompts, np.asarray(encoded.num_tokens),
                                               self.config.model)
        except Exception as exc:  # every waiter must hear about it
            logger.exception("predict batch of %d prompts failed", len(prompts))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.num_predictions += len(prompts)
        for i, (text, p50) in enumerate(zip(prompts, estimates.p50.tolist())):
            key = prompt_key(text)
            self._recent[key] = p50
            self._recent_vectors[key] = (encoded.vectors[i].copy(), encoded.num_tokens[i])
            self._recent_vectors.move_to_end(key)
        while len(self._recent) > _MAX_REMEMBERED:
            self._recent.popitem(last=False)
        while len(self._recent_vectors) > _MAX_CACHED_VECTORS:
            self._recent_vectors.popitem(last=False)
        start = 0
        for pending in batch:
            end = start + len(pending.prompts)
            part = Estimates(estimates.mean[start:end], estimates.p50[start:end], estimates.p90[start:end],
                             estimates.bucket_probs[start:end], estimates.source[start:end],
                             estimates.top_similarity[start:end])
            truncated = [i for i, t in enumerate(encoded.truncated[start:end]) if t]
            if not pending.future.done():
                pending.future.set_result(PredictResult(part, truncated))
            start = end

    # -- observe -------------------------------------------------------------------------

    async def observe(self, prompts: list[str], output_tokens: list[int], models: list[str]) -> None:
        """Adds finished requests to the history (validated by the caller)."""
        if not prompts:
            return
        vectors, num_tokens = await self._vectors_to_store(prompts)
        rows = self.history.add_prompts(prompts, vectors, num_tokens)
        self.history.add_observations(rows, [m or self.config.model for m in models], output_tokens)
        self.estimator.sync()
        for text, tokens in zip(prompts, output_tokens):
            predicted = self._recent.pop(prompt_key(text), None)
            if predicted is not None:
                self._abs_error_sum += abs(predicted - tokens)
                self._num_scored += 1
        self.num_observations += len(prompts)
        self._since_refit += len(prompts)
        self._dirty = True
        if self._since_refit >= self.config.refit_after_observations:
            self._refit_now.set()

    async def _vectors_to_store(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors and token counts for ``History.add_prompts``: cached where a recent Predict
        embedded the prompt, encoded where it is new, zeros where the history already holds it
        (``add_prompts`` ignores those; the history only grows, so that stays true across the
        await below)."""
        vectors = np.zeros((len(prompts), self.encoder.dim), np.float32)
        num_tokens = [0] * len(prompts)
        missing = []
        for i, text in enumerate(prompts):
            if self.history.row_of(text) is not None:
                continue
            cached = self._recent_vectors.pop(prompt_key(text), None)
            if cached is None:
                missing.append(i)
            else:
                vectors[i], num_tokens[i] = cached
        if missing:
            encoded = await self.encoder.encode_async([prompts[i] for i in missing])
            vectors[missing] = encoded.vectors
            for i, n in zip(missing, encoded.num_tokens):
                num_tokens[i] = n
        return vectors, num_tokens

    async def refit(self) -> bool:
        self._since_refit = 0
        self._refit_now.clear()
        started = time.perf_counter()
        ok = await asyncio.to_thread(self.estimator.fit)
        logger.info("refit on %d samples in %.2f s", self.estimator.num_fit_samples,
                    time.perf_counter() - started)
        return ok

    async def _refit_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._refit_now.wait(), self.config.refit_interval_s)
            except TimeoutError:
                pass
            if self._since_refit:
                try:
                    await self.refit()
                except Exception:
                    logger.exception("background refit failed; keeping the previous fit")

    # -- persistence and stats -------------------------------------------------------------

    def snapshot(self) -> None:
        path = save_snapshot(self.history, self.config.index_dir, self.encoder.name)
        self._dirty = False
        logger.info("snapshot %s (%d prompts)", path, self.history.num_prompts)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.snapshot_interval_s)
            if self._dirty:
                try:
                    self.snapshot()
                except OSError:
                    logger.exception("periodic snapshot failed; will retry")

    @property
    def mean_abs_error(self) -> float:
        return self._abs_error_sum / self._num_scored if self._num_scored else 0.0
