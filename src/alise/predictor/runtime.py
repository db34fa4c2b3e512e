"""The predictor's runtime (no gRPC): batching, online updates, refits, the log and snapshots.

One writer: the history, the faiss index and the estimator's live statistics are mutated only
on the event loop (``observe``, under ``_write_lock``), and read there too (``predict``'s
neighbour search). What leaves the loop: embedding (``Encoder.encode_async``), refitting
(``fit_estimator`` reads a consistent prefix of the append-only history; its result is swapped
in by one assignment), the log's fsync and the snapshot's files. A refit is served only if it
validates no worse than the serving fit: a trial fit without the newest observations (the
newer half of those the serving fit never saw) must predict them about as well as the serving
fit does, both from the same history before them (``fitting.validate_refit``, on the loop,
since it searches the index). A snapshot captures
its prefix under the write lock (observations wait that long; Predict does not) and writes
it from a worker thread, so Predict keeps answering while one is written.

Predict calls that queue up while the encoder is busy are embedded together in its next call
(up to ``max_batch_prompts``), which is what makes 256 concurrent single-prompt requests cost
about one batch; an idle encoder starts at once (``batch_window_ms`` = 0, the default), so a
lone request pays no batching delay.

A prompt may come with its conversation's context (:class:`PromptContext`): the text read in
its place (the latest user message of a rendered chat) and the earlier answers' lengths,
which shift its estimate (``context.py``); when such a prediction's answer is observed, the
pair teaches the estimator how much a conversation's earlier answers say.

Each prediction gets an id and is remembered (its key, the text the encoder saw, its vector
and p50) for ``max_pending_predictions`` predictions: an Observe naming the id needs no
prompt and no second embedding (nor does one that sends the prompt of a recent Predict). What is
stored of a prompt is only what the encoder saw (the history is keyed by the SHA-1 of the whole
text), so a 10 MB prompt costs the history
a few kB.

Durability: with an ``index_dir``, every accepted observation is appended to the write-ahead
log before its answer is sent (``wal.py``, fsync'd in batches), and a snapshot every
``snapshot_interval_s`` lets the log start over. Start-up loads the snapshot and replays the
log, so a ``kill -9`` loses nothing that was answered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from alise.predictor.config import PredictorConfig
from alise.predictor.context import PromptContext
from alise.predictor.encoder import Encoder
from alise.predictor.estimator import Estimates, LengthEstimator
from alise.predictor.fitting import Validation, fit_estimator, holdout_start, refit, trial_fit, validate_refit
from alise.predictor.history import History, prompt_key
from alise.predictor.index import VectorIndex
from alise.predictor.snapshot import capture, prepare_index_dir, write_snapshot
from alise.predictor.startup import add_logged, bootstrap_history, replay_log, restore_history
from alise.predictor.wal import LoggedObservation, WriteAheadLog

logger = logging.getLogger(__name__)
#: De-duplication ids of recent observations remembered (a resend is of recent ones).
_MAX_DEDUP_IDS = 65_536


class ShuttingDown(RuntimeError):
    """The runtime is closing; pending and new predictions are refused."""


@dataclass
class PredictResult:
    estimates: Estimates
    truncated: list[int]
    prediction_ids: list[str]


@dataclass
class _Pending:
    prompts: list[str]
    future: asyncio.Future
    contexts: list[PromptContext] | None = None


@dataclass(frozen=True)
class _Prediction:
    key: str
    text: str  # what the encoder saw
    vector: np.ndarray | None  # None: the history holds the prompt already
    num_tokens: int
    p50: float
    #: The earlier answers' lengths its Predict came with (empty: none).
    previous: tuple[int, ...] = ()


@dataclass(frozen=True)
class ObservationIn:
    """One observation as the service received it (validated): a prediction id, a prompt, or
    both."""

    output_tokens: int
    model: str = ""
    prediction_id: str = ""
    prompt: str = ""
    dedup_id: str = ""


@dataclass
class ObserveOutcome:
    num_accepted: int = 0
    #: Indexes (into the call's list) whose prediction id is unknown and that had no prompt.
    unknown: list[int] | None = None


class PredictorRuntime:
    """Owns encoder, history, estimator and log; every public coroutine runs on one loop."""

    def __init__(self, config: PredictorConfig, encoder: Encoder, history: History,
                 wal: WriteAheadLog | None = None, dedup_ids: list[str] | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.history = history
        self.estimator = LengthEstimator(history, config.estimator)
        self.wal = wal
        self.num_predictions = 0
        self.num_observations = 0
        self.last_snapshot_at = 0.0
        self._abs_error_sum = 0.0
        self._num_scored = 0
        self._predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self._prediction_of_key: dict[str, str] = {}  # the latest prediction of each prompt
        self._ids = (f"{os.urandom(6).hex()}-{n}" for n in itertools.count())
        self._dedup: OrderedDict[str, None] = OrderedDict.fromkeys(dedup_ids or ())
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._since_refit = 0
        #: The last refit's check against the serving fit (None: none was judged yet).
        self.last_validation: Validation | None = None
        self._dirty = False
        self._refit_now = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def create(cls, config: PredictorConfig, encoder: Encoder | None = None) -> PredictorRuntime:
        if config.index_dir:
            prepare_index_dir(config.index_dir)  # before the model loads: fail fast
        if encoder is None:
            encoder = await asyncio.to_thread(
                Encoder, config.encoder_path, num_threads=config.num_threads,
                max_seq_length=config.encoder_max_seq_length, int8=config.encoder_int8,
                layers=config.encoder_layers)
        kwargs = {"ivf_threshold": config.ivf_threshold}
        restored = None
        if config.index_dir:
            restored = await asyncio.to_thread(restore_history, config.index_dir, encoder, **kwargs)
        if restored is not None:
            history, first, dedup, reembedded = restored
        else:
            history, first, dedup, reembedded = History(VectorIndex(encoder.dim, **kwargs)), 0, [], False
            if config.bootstrap:
                n = await asyncio.to_thread(bootstrap_history, history, encoder, config.bootstrap,
                                            config.tokenizer_path)
                logger.info("bootstrapped %d observations from %s", n, ", ".join(config.bootstrap))
            if config.index_dir:  # a log without a snapshot (a crash before the first one)
                dedup = await asyncio.to_thread(replay_log, history, config.index_dir, 0)
        wal = None
        if config.index_dir:
            wal = WriteAheadLog(config.index_dir, first_segment=first,
                                sync_delay_s=config.wal_sync_delay_ms / 1000.0)
        runtime = cls(config, encoder, history, wal, dedup)
        await asyncio.to_thread(refit, runtime.estimator)
        if wal is not None:
            try:
                wal.open(dedup[-_MAX_DEDUP_IDS:])
                if reembedded or (restored is None and config.bootstrap):
                    await runtime.snapshot()
            except OSError as exc:  # a full disk: Predict serves, Observe waits for room
                logger.warning("cannot write %s (%s): predictions are served; observations are refused "
                               "until the log can be written", config.index_dir, exc.strerror or exc)
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
        if self.wal is not None:
            if self._dirty:
                await self.snapshot()
            self.wal.close()

    # -- predict -------------------------------------------------------------------------

    async def predict(self, prompts: list[str], contexts: list[PromptContext] | None = None) -> PredictResult:
        """Validated prompts in (with a context each, or none), estimates out (batched with
        concurrent callers)."""
        if contexts is not None and len(contexts) != len(prompts):
            raise ValueError(f"{len(contexts)} contexts for {len(prompts)} prompts")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(list(prompts), future, list(contexts) if contexts else None))
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
        contexts = [c for pending in batch for c in (pending.contexts or [PromptContext()] * len(pending.prompts))]
        # What is read, stored and keyed: the query where a context gives one.
        texts = (p for pending in batch for p in pending.prompts)
        prompts = [c.query or p for p, c in zip(texts, contexts, strict=True)]
        try:
            encoded = await self.encoder.encode_async(prompts)
            seen = [p[:n] for p, n in zip(prompts, encoded.visible_chars, strict=True)]
            keys = [prompt_key(p) for p in prompts]
            previous = [c.previous_output_tokens for c in contexts]
            estimates = self.estimator.predict(encoded.vectors, seen, np.asarray(encoded.num_tokens),
                                               self.config.model, keys=keys,
                                               previous_output_tokens=previous if any(previous) else None)
        except Exception as exc:  # every waiter must hear about it
            logger.exception("predict batch of %d prompts failed", len(prompts))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.num_predictions += len(prompts)
        ids = [next(self._ids) for _ in prompts]
        for i, pid in enumerate(ids):
            self._predictions[pid] = _Prediction(keys[i], seen[i], encoded.vectors[i].copy(),
                                                 encoded.num_tokens[i], float(estimates.p50[i]), previous[i])
            self._prediction_of_key[keys[i]] = pid
        while len(self._predictions) > self.config.max_pending_predictions:
            self._take_prediction(next(iter(self._predictions)))
        start = 0
        for pending in batch:
            end = start + len(pending.prompts)
            part = Estimates(estimates.mean[start:end], estimates.p50[start:end], estimates.p90[start:end],
                             estimates.bucket_probs[start:end], estimates.source[start:end],
                             estimates.top_similarity[start:end])
            truncated = [i for i, t in enumerate(encoded.truncated[start:end]) if t]
            if not pending.future.done():
                pending.future.set_result(PredictResult(part, truncated, ids[start:end]))
            start = end

    # -- observe -------------------------------------------------------------------------

    async def observe(self, items: list[ObservationIn]) -> ObserveOutcome:
        """Adds finished requests to the history and, with an index dir, to the log; returns
        once they are durable. Items must be validated (``output_tokens >= 0``, an id or a
        prompt); repeats of a de-duplication id already taken count as accepted."""
        outcome = ObserveOutcome(unknown=[])
        fresh: list[tuple[ObservationIn, _Prediction | None]] = []
        for i, item in enumerate(items):
            if item.dedup_id and item.dedup_id in self._dedup:
                outcome.num_accepted += 1
                continue
            known = self._take_prediction(item.prediction_id)
            if known is None and item.prompt:  # no id: a recent Predict of the same text will do
                known = self._take_prediction(self._prediction_of_key.get(prompt_key(item.prompt), ""))
            if known is None and not item.prompt:
                outcome.unknown.append(i)
                continue
            fresh.append((item, known))
        if fresh:
            logged = await self._resolve(fresh)
            predicted = [p.p50 if p else None for _, p in fresh]
            async with self._write_lock:
                # Again under the lock: another stream (a resend racing the broken stream's
                # last batch) may have taken the same ids during the awaits above.
                keep, seen = [], set()
                for k, o in enumerate(logged):
                    if o.dedup_id and (o.dedup_id in self._dedup or o.dedup_id in seen):
                        continue
                    keep.append(k)
                    seen.add(o.dedup_id)
                self._apply([logged[k] for k in keep], [predicted[k] for k in keep])
                for k in keep:
                    known = fresh[k][1]
                    if known is not None and known.previous:
                        self.estimator.observe_context(logged[k].model, logged[k].output_tokens, known.previous)
            if self.wal is not None:
                await self.wal.sync()
            outcome.num_accepted += len(fresh)
        return outcome

    def _take_prediction(self, prediction_id: str) -> _Prediction | None:
        known = self._predictions.pop(prediction_id, None) if prediction_id else None
        if known is not None and self._prediction_of_key.get(known.key) == prediction_id:
            del self._prediction_of_key[known.key]
        return known

    async def _resolve(self, fresh) -> list[LoggedObservation]:
        """Each observation's key, stored text and (for prompts new to the history) vector:
        from its prediction where known, from the history where it holds the prompt, else by
        embedding the prompt (the history only grows, so what it holds stays true across
        the await)."""
        resolved: list[_Prediction | None] = []
        need: list[int] = []
        for i, (item, known) in enumerate(fresh):
            if known is None:
                key = prompt_key(item.prompt)
                row = self.history.row_of_key(key)
                if row is None:
                    need.append(i)
                else:
                    known = _Prediction(key, self.history.texts[row], None,
                                        int(self.history.prompt_tokens[row]), 0.0)
            resolved.append(known)
        if need:
            encoded = await self.encoder.encode_async([fresh[i][0].prompt for i in need])
            for j, i in enumerate(need):
                prompt = fresh[i][0].prompt
                resolved[i] = _Prediction(prompt_key(prompt), prompt[:encoded.visible_chars[j]],
                                          encoded.vectors[j], encoded.num_tokens[j], 0.0)
        return [LoggedObservation(p.key, p.text, p.num_tokens, item.model or self.config.model,
                                  item.output_tokens, item.dedup_id, p.vector)
                for (item, _), p in zip(fresh, resolved, strict=True)]

    def _apply(self, logged: list[LoggedObservation], predicted: list[float | None]) -> None:
        """Adds to the log, then the history and the estimator (on the loop, under the lock).
        The log first: a write that fails (a full disk) raises with nothing taken, and the
        sender's resend is then taken once."""
        new = [o.vector is not None and self.history.row_of_key(o.key) is None for o in logged]
        logged = [o if is_new else LoggedObservation(o.key, o.text, o.prompt_tokens, o.model,
                                                     o.output_tokens, o.dedup_id)
                  for o, is_new in zip(logged, new, strict=True)]
        if self.wal is not None:
            self.wal.append(logged)
        add_logged(self.history, logged)
        self.estimator.sync()
        for o, p50 in zip(logged, predicted, strict=True):
            if p50 is not None:
                self._abs_error_sum += abs(p50 - o.output_tokens)
                self._num_scored += 1
            if o.dedup_id:
                self._dedup[o.dedup_id] = None
        while len(self._dedup) > _MAX_DEDUP_IDS:
            self._dedup.popitem(last=False)
        self.num_observations += len(logged)
        self._since_refit += len(logged)
        self._dirty = True
        if self._since_refit >= self.config.refit_after_observations:
            self._refit_now.set()

    async def refit(self) -> bool:
        """Fits heads and stackers on the whole history (in a worker thread) and serves the
        fit, unless it validates worse than the one serving: then a trial fit without the
        newest observations predicts them worse than the serving fit does (``fitting.py``).
        True when a new fit is served."""
        self._since_refit = 0
        self._refit_now.clear()
        started = time.perf_counter()
        serving, history, config = self.estimator.fitted, self.history, self.estimator.config
        verdict = None
        start = holdout_start(history, serving) if serving is not None else None
        if start is not None:
            end = history.num_observations
            trial, estimator = await asyncio.to_thread(trial_fit, history, start, config)
            if trial is not None:
                verdict = validate_refit(history, estimator, start, end, serving, trial)
                self.last_validation = verdict
        if verdict is not None and not verdict.accepted:
            logger.warning("refit not served: it validates worse than the serving fit (error %.4f vs "
                           "%.4f on the newest %d observations, standard error of the difference "
                           "%.4f)", verdict.candidate_error, verdict.serving_error, verdict.num_held_out,
                           verdict.difference_se)
            return False
        candidate = await asyncio.to_thread(fit_estimator, history, config)  # judged: now the whole history
        if candidate is None:
            return False
        self.estimator.install(candidate)
        logger.info("refit on %d samples in %.2f s%s", candidate.num_samples, time.perf_counter() - started,
                    "" if verdict is None else f" (validated: error {verdict.candidate_error:.4f} vs "
                    f"{verdict.serving_error:.4f} serving, {verdict.num_held_out} observations)")
        return True

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

    async def snapshot(self) -> None:
        """Captures the history (observations wait; Predict does not), starts a new log
        segment, writes the snapshot from a worker thread, then drops the segments it covers."""
        async with self._snapshot_lock:
            async with self._write_lock:
                state = await asyncio.to_thread(capture, self.history)
                segment = self.wal.rotate(list(self._dedup)) if self.wal is not None else 0
                self._dirty = False
            write = asyncio.ensure_future(asyncio.to_thread(
                write_snapshot, state, self.config.index_dir, self.encoder.name,
                max_seq_length=self.encoder.max_seq_length, wal_segment=segment))
            try:
                path = await asyncio.shield(write)
            except asyncio.CancelledError:
                # NOTE: the thread cannot be stopped; no other snapshot may start while it
                # writes (an older one finishing last would delete the newer one).
                await asyncio.wait([write])
                raise
            except BaseException:
                self._dirty = True
                raise
            if self.wal is not None:
                self.wal.delete_before(segment)
            self.last_snapshot_at = time.time()
            logger.info("snapshot %s (%d prompts)", path, state.num_prompts)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.snapshot_interval_s)
            if self._dirty:
                try:
                    await self.snapshot()
                except OSError:
                    logger.exception("periodic snapshot failed; the log keeps everything; will retry")

    @property
    def mean_abs_error(self) -> float:
        return self._abs_error_sum / self._num_scored if self._num_scored else 0.0
