"""Latency profiler: this engine's step time on its own device, fitted into a ``LatencyModel``.

The scheduler and the simulator price a step with :class:`alise.core.latency_model.LatencyModel`
(``c0 + c_seq*num_seqs + c_ctx*total_context + c_pre*prefill_tokens + c_pre2*sum(prefill^2)``).
This module measures real steps over a grid -- decode batches x contexts, single prefills,
mixed steps (one prefill beside a decode batch) and steps with several short prompts beside a
decode batch (what serving sees when requests arrive together) -- and fits the model to them.

A step is timed the way the worker reports it (``StepReport.step_duration_s``): the forward
pass plus greedy sampling, up to the read-back of the tokens, wall clock, median of
``repeats`` after a warm-up. Each sequence of a point gets its own blocks, so every point reads
as many KV bytes as a real step would; points whose blocks do not fit the cache are skipped.
``total_context`` counts each sequence's tokens including the ones fed (what the scheduler
passes to ``observe_step``). Profiling writes random K/V into the cache and zeroes it after:
run it before serving.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch

from alise.core.latency_model import LatencyModel
from alise.core.sampling import SamplingParams
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.runner import ModelRunner
from alise.worker.model.sampler import Sampler

logger = logging.getLogger(__name__)

#: (num_seqs, total_context, prefill_lens, seconds): what ``LatencyModel.fit`` takes.
Sample = tuple[int, int, list[int], float]


@dataclass(frozen=True)
class ProfileGrid:
    """The steps to measure."""

    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    decode_contexts: tuple[int, ...] = (128, 512, 1024, 1536)
    prefill_lens: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 1536, 2000)
    #: (prefill length, decode batch, decode context)
    mixed: tuple[tuple[int, int, int], ...] = ((64, 8, 512), (256, 16, 512), (512, 32, 512), (1024, 8, 1024),
                                               (512, 48, 256), (2000, 16, 512))
    #: (number of prompts, prompt length, decode batch, decode context): several prefill chunks
    #: in one step, which prices the per-chunk cost apart from the per-token one.
    #: The first ten fit a 15k-token cache (OPT-13B on an 80 GB card at 64 sequences).
    multi: tuple[tuple[int, int, int, int], ...] = ((1, 48, 56, 240), (2, 48, 56, 240), (4, 48, 56, 240),
                                                    (1, 48, 8, 512), (4, 48, 8, 512), (8, 32, 16, 256),
                                                    (3, 128, 32, 400), (2, 256, 8, 512), (4, 64, 0, 0),
                                                    (1, 400, 48, 240), (1, 48, 56, 400), (4, 48, 56, 400))
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


def plan_points(grid: ProfileGrid, *, num_blocks: int, block_size: int, max_model_len: int,
                max_num_seqs: int) -> list[tuple[int, int, int, int, int]]:
    """The grid's points that fit: ``(num_prompts, prompt_len, num_decode, decode_context,
    blocks_needed)``."""
    points = [(0, 0, b, c) for b in grid.decode_batch_sizes for c in grid.decode_contexts]
    points += [(1, n, 0, 0) for n in grid.prefill_lens]
    points += [(1, *point) for point in grid.mixed]
    points += list(grid.multi)
    fitting = []
    for num_prompts, prefill_len, num_decode, context in points:
        if num_decode + num_prompts > max_num_seqs:
            continue
        if max(prefill_len, context + 1 if num_decode else 0) > max_model_len:
            continue
        blocks = num_prompts * -(-prefill_len // block_size) + num_decode * -(-(context + 1) // block_size)
        if blocks <= num_blocks:
            fitting.append((num_prompts, prefill_len, num_decode, context, blocks))
    return fitting


def point_chunks(prefill_len: int, num_decode: int, context: int, *, block_size: int,
                 vocab_size: int, num_prompts: int = 1) -> list[SeqChunk]:
    """One point's step: ``num_prompts`` prompts of ``prefill_len`` (if any) then ``num_decode``
    one-token sequences at ``context``, on consecutive, disjoint block ranges."""
    chunks = []
    next_block = 0

    def take(num_tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-num_tokens // block_size)
        next_block += n
        return list(range(next_block - n, next_block))

    for p in range(num_prompts if prefill_len else 0):
        tokens = [(17 * i + 5 + 3 * p) % vocab_size for i in range(prefill_len)]
        chunks.append(SeqChunk(tokens, 0, take(prefill_len)))
    for i in range(num_decode):
        chunks.append(SeqChunk([(31 * i + 7) % vocab_size], context, take(context + 1)))
    return chunks


class StepProfiler:
    """Times engine steps (forward + greedy sampling) of one runner."""

    def __init__(self, runner: ModelRunner, *, repeats: int = 5, clock: Callable[[], float] = time.perf_counter):
        self.runner = runner
        self.sampler = Sampler()
        self.repeats = repeats
        self.clock = clock

    def time_step(self, chunks: list[SeqChunk]) -> float:
        """Median wall seconds of one step over ``chunks`` (after one untimed warm-up)."""
        params = [SamplingParams(temperature=0.0)] * len(chunks)
        generators = [None] * len(chunks)
        times = []
        for i in range(self.repeats + 1):
            start = self.clock()
            self.sampler.sample(self.runner.execute(chunks), params, generators)
            if i:
                times.append(self.clock() - start)
        return statistics.median(times)

    def run(self, grid: ProfileGrid, max_num_seqs: int = 64) -> list[Sample]:
        runner = self.runner
        points = plan_points(grid, num_blocks=runner.num_blocks, block_size=runner.block_size,
                             max_model_len=runner.max_model_len, max_num_seqs=max_num_seqs)
        cache = runner.kv_cache
        if runner.device.type == "cuda":
            cache.fill_random_()  # realistic data, never zeros (see the module docstring)
        samples: list[Sample] = []
        try:
            for num_prompts, prefill_len, num_decode, context, _ in points:
                chunks = point_chunks(prefill_len, num_decode, context, block_size=runner.block_size,
                                      vocab_size=runner.vocab_size, num_prompts=num_prompts)
                seconds = self.time_step(chunks)
                total_context = sum(c.start_pos + len(c.token_ids) for c in chunks)
                prefill_lens = [len(c.token_ids) for c in chunks if len(c.token_ids) > 1]
                samples.append((len(chunks), total_context, prefill_lens, seconds))
                logger.info("profile: %d x prefill %d + %d decodes at %d: %.2f ms", num_prompts, prefill_len,
                            num_decode, context, seconds * 1e3)
        finally:
            cache.key_cache.zero_()
            cache.value_cache.zero_()
        return samples


def fit_profile(samples: list[Sample], *, name: str, meta: dict) -> LatencyModel:
    """Fits ``samples``; the profile's meta gets the samples and the fit's relative errors."""
    model = LatencyModel.fit(samples, name=name, meta=meta)
    errors = [abs(model.step_s(n, ctx, pre) - s) / s for n, ctx, pre, s in samples]
    model.meta.update(num_samples=len(samples), fit_mean_rel_error=statistics.fmean(errors),
                      fit_max_rel_error=max(errors),
                      samples=[[n, ctx, list(pre), round(s, 6)] for n, ctx, pre, s in samples])
    return model


def profile_runner(runner: ModelRunner, *, grid: ProfileGrid | None = None, max_num_seqs: int = 64,
                   command: str = "", engine: str = "") -> LatencyModel:
    """Measures ``runner`` over ``grid`` and returns the fitted profile, labelled with its device."""
    grid = grid or ProfileGrid()
    samples = StepProfiler(runner, repeats=grid.repeats).run(grid, max_num_seqs=max_num_seqs)
    if not samples:
        raise ValueError("no profile point fits this KV cache")
    device = runner.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    graphs = runner.decode_graphs is not None
    mixed = getattr(runner, "mixed_graphs", None) is not None
    meta = dict(kind="measured", device=device_name, date=date.today().isoformat(), command=command,
                model=runner.loaded.name, dtype=str(runner.loaded.dtype).removeprefix("torch."),
                random_weights=runner.loaded.random_weights, block_size=runner.block_size,
                tensor_parallel_size=runner.tp.world_size if runner.tp is not None else 1,
                kv_bytes_per_token=KVCache.block_bytes(runner.config, 1, runner.kv_cache.dtype),
                engine=engine or f"alise ModelRunner, {runner.attention_backend.name} attention, "
                                 f"cuda graphs {'on' if graphs else 'off'}, mixed-step graphs "
                                 f"{'on' if mixed else 'off'}")
    return fit_profile(samples, name=f"{runner.loaded.name}-{device.type}", meta=meta)


def save_profile(model: LatencyModel, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(model.to_json() + "\n")
