"""Next-token sampling for a batch, each row with its own parameters and random stream.

First vLLM's logit adjustments, on the raw logits and for greedy rows too (``adjust_logits``):
logit bias, the ``min_tokens`` mask of the stop ids and EOS, then the repetition, frequency and
presence penalties; only the rows asking for one are copied and changed, every other row stays
bit for bit as the model gave it. Filtering runs vectorized on the logits' device: temperature
scaling, then min-p (tokens less than ``min_p`` times as likely as the most likely one are
dropped: in logits, those more than ``-log(min_p)`` below the row's largest), then top-k, then
top-p over the surviving tokens (the nucleus: the fewest most-likely tokens whose mass reaches
``top_p``). The most likely token always survives every filter; vLLM applies them in the same
order. The draw is an exponential race over the vocabulary: a seeded request takes its noise
from its own generator, so its tokens depend only on its seed and its logits, never on its
batch-mates. Greedy rows (temperature 0, or top_k 1) take the argmax and draw nothing. The
returned Python list is the step's only host sync (``sample_ids`` returns the ids on the
device, for a step that reads them back later); the adjustments add none: their rows, ids and
values go up through ``upload``, and an output token still on the device is counted there.

Logprobs (``Sampler.logprobs``) are vLLM's default raw logprobs: the log-softmax of the logits
the model gave, before every adjustment above, for the rows whose params ask
(``SamplingParams.logprobs``); a step where none does computes nothing. They come back packed
with their row's top-k in one float64 tensor on the device (:class:`Logprobs`), which the step
reads back with its sampled ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alise.core.commands import TokenLogprobs
from alise.core.sampling import SamplingParams

#: ``upload(values, dtype)``: the values as a tensor on the logits' device.
Upload = Callable[[Sequence, torch.dtype], torch.Tensor]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (any value in ``[0, 2**64)``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class History:
    """A row's tokens before the token it samples, for the penalties and ``min_tokens``.

    ``token_ids`` is the prompt then the output tokens the host holds; ``num_output`` counts
    every output token so far, including, on an overlapped step, the one the step before
    sampled and the host has not read: it is row ``pending_row`` of that step's sampled ids
    (still on the device), and is not in ``token_ids``."""

    token_ids: Sequence[int]
    num_output: int
    pending_row: int | None = None

    @property
    def num_output_on_host(self) -> int:
        return self.num_output - (self.pending_row is not None)

    @property
    def prompt_ids(self) -> Sequence[int]:
        return self.token_ids[:len(self.token_ids) - self.num_output_on_host]

    @property
    def output_ids_on_host(self) -> Sequence[int]:
        return self.token_ids[len(self.token_ids) - self.num_output_on_host:]


@dataclass(frozen=True)
class Logprobs:
    """A step's logprobs on the device, not read back: ``packed[j]`` is row ``rows[j]``'s
    sampled-token logprob, then its ``width`` top logprobs, then their ids (float64 holds every
    id exactly), one tensor so that one copy brings them back. ``counts[j]``: how many of the
    top entries row ``rows[j]`` asked for (``SamplingParams.logprobs``)."""

    num_rows: int
    rows: list[int]
    counts: list[int]
    width: int
    packed: torch.Tensor

    def unpack(self, host: torch.Tensor) -> list[TokenLogprobs | None]:
        """Each row's :class:`TokenLogprobs` (None where it did not ask) from ``packed`` as
        read back to ``host``."""
        values = host.tolist()
        out: list[TokenLogprobs | None] = [None] * self.num_rows
        width = self.width
        for row, count, line in zip(self.rows, self.counts, values, strict=True):
            out[row] = TokenLogprobs(line[0], tuple(int(t) for t in line[1 + width:1 + width + count]),
                                     tuple(line[1:1 + count]))
        return out


class Sampler:
    """Stateless: all per-request state is in the params, generators and histories passed to
    :meth:`sample`. ``eos_token_id``: the model's EOS, which ``min_tokens`` keeps out."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None],
               histories: list[History | None] | None = None) -> list[int]:
        """One token id per row of ``logits [n, vocab]`` (float32).

        ``generators[i]`` is row i's random stream (None: the global torch RNG). It must live on
        ``logits.device``. ``histories[i]`` is row i's tokens so far, needed where its params
        have a penalty or ``min_tokens`` (``SamplingParams.needs_history``; None elsewhere, or no list
        at all).
        """
        return self.sample_ids(logits, params, generators, histories=histories).tolist()

    def sample_ids(self, logits: torch.Tensor, params: list[SamplingParams],
                   generators: list[torch.Generator | None], upload: Upload | None = None,
                   histories: list[History | None] | None = None,
                   pending_ids: torch.Tensor | None = None, adjust: bool = True) -> torch.Tensor:
        """:meth:`sample`'s ids as an int64 tensor on ``logits.device``, not read back.
        ``upload(values, dtype)`` puts the rows' parameters on the device (default:
        ``torch.tensor``, which waits for the device's queue on CUDA; an overlapped step passes
        pinned non-blocking copies, ``alise.worker.model.overlap.PinnedUploads``).
        ``pending_ids``: the step before's sampled ids, which ``History.pending_row`` indexes.
        ``adjust=False``: the caller knows no row asks for an adjustment (none is looked for)."""
        device = logits.device
        if upload is None:
            def upload(values, dtype):
                return torch.tensor(values, dtype=dtype, device=device)
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"need one SamplingParams and one generator per row: {num_rows} rows, "
                             f"{len(params)} params, {len(generators)} generators")
        if adjust:
            logits = adjust_logits(logits, params, histories, upload, eos_token_id=self.eos_token_id,
                                   pending_ids=pending_ids)
        greedy_ids = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled_rows:
            return greedy_ids
        rows = upload(sampled_rows, torch.int64)
        sub_params = [params[i] for i in sampled_rows]
        temperatures = upload([p.temperature for p in sub_params], torch.float32)
        scaled = logits.index_select(0, rows) / temperatures[:, None]
        if any(p.min_p > 0 for p in sub_params):
            scaled = _mask_min_p(scaled, sub_params, upload)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in sub_params):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            scaled = torch.empty_like(scaled).scatter_(1, order, _mask_sorted(sorted_logits, sub_params, upload))
        probs = torch.softmax(scaled, dim=-1)
        # argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i. The noise is
        # indexed by token id, so a row's pick does not depend on whether its batch-mates made
        # the batch take the sorted (filtering) path.
        noise = self._exponentials([generators[i] for i in sampled_rows], probs)
        # A zero draw would make a filtered token's 0 / 0 a NaN, which argmax would pick.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        picks = (probs / noise).argmax(dim=-1)
        return greedy_ids.index_copy(0, rows, picks)

    @staticmethod
    def logprobs(logits: torch.Tensor, params: list[SamplingParams], ids: torch.Tensor,
                 upload: Upload | None = None) -> Logprobs | None:
        """The raw logprobs (the log-softmax of ``logits`` as the model gave them) of the rows
        that ask: of their sampled ``ids`` and of their most likely tokens. None, with nothing
        queued, when no row asks."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        device = logits.device
        if upload is None:
            def upload(values, dtype):
                return torch.tensor(values, dtype=dtype, device=device)
        width = min(max(params[i].logprobs for i in rows), logits.shape[-1])  # a vocabulary under 20
        counts = [min(params[i].logprobs, width) for i in rows]
        index = upload(rows, torch.int64)
        logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        sampled = logprobs.gather(1, ids.index_select(0, index)[:, None])
        top_logprobs, top_ids = logprobs.topk(width, dim=-1)
        packed = torch.cat([sampled.double(), top_logprobs.double(), top_ids.double()], dim=1)
        return Logprobs(len(params), rows, counts, width, packed)

    @staticmethod
    def _exponentials(generators: list[torch.Generator | None], like: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise shaped like ``like``, each row from its own generator where it has one."""
        noise = torch.empty_like(like)
        if any(g is None for g in generators):
            noise.exponential_()  # one launch for all rows; seeded rows are overwritten below
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return noise


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History | None] | None,
                  upload: Upload, *, eos_token_id: int | None = None,
                  pending_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` with vLLM's adjustments applied to the rows that ask for one (a new tensor;
    ``logits`` itself when none does): bias, the ``min_tokens`` mask, then the penalties."""
    if not any(p.adjusts_logits for p in params):
        return logits
    rows = []
    for i, p in enumerate(params):
        if not p.adjusts_logits:
            continue
        history = histories[i] if histories is not None else None
        if p.needs_history and history is None:
            raise ValueError(f"row {i} has a penalty or min_tokens but no token history")
        if p.logit_bias or p.has_penalties or not p.can_stop(history.num_output):
            rows.append(i)
    if not rows:
        return logits
    index = upload(rows, torch.int64)
    sub = logits.index_select(0, index)
    sub_params = [params[i] for i in rows]
    sub_histories = [histories[i] if histories is not None else None for i in rows]
    _add_bias(sub, sub_params, upload)
    _mask_early_stops(sub, sub_params, sub_histories, upload, eos_token_id)
    if any(p.has_penalties for p in sub_params):
        _penalize(sub, sub_params, sub_histories, upload, pending_ids)
    return logits.index_copy(0, index, sub)


def _flat(rows: list[int], cols: Sequence[int], width: int, upload: Upload) -> torch.Tensor:
    """The positions ``(rows[i], cols[i])`` of a contiguous ``[n, width]`` tensor, flattened:
    ``index_add_`` and ``index_fill_`` on them queue their work without a host sync."""
    return upload(np.asarray(rows, dtype=np.int64) * width + np.asarray(cols, dtype=np.int64), torch.int64)


def _add_bias(sub: torch.Tensor, params: list[SamplingParams], upload: Upload) -> None:
    rows = [j for j, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    cols = [t for p in params for t, _ in p.logit_bias]
    values = upload([b for p in params for _, b in p.logit_bias], sub.dtype)
    sub.view(-1).index_add_(0, _flat(rows, cols, sub.shape[-1], upload), values)


def _mask_early_stops(sub: torch.Tensor, params: list[SamplingParams], histories: list[History | None],
                      upload: Upload, eos_token_id: int | None) -> None:
    """-inf on the stop ids and EOS of the rows short of their ``min_tokens`` (vLLM masks EOS
    even under ``ignore_eos``). Ids past the logits' width cannot be sampled anyway."""
    vocab_size = sub.shape[-1]
    rows, cols = [], []
    for j, (p, history) in enumerate(zip(params, histories, strict=True)):
        if p.min_tokens and not p.can_stop(history.num_output):
            stops = set(p.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
            ids = [t for t in sorted(stops) if 0 <= t < vocab_size]
            rows += [j] * len(ids)
            cols += ids
    if rows:
        sub.view(-1).index_fill_(0, _flat(rows, cols, vocab_size, upload), float("-inf"))


def _penalize(sub: torch.Tensor, params: list[SamplingParams], histories: list[History | None],
              upload: Upload, pending_ids: torch.Tensor | None) -> None:
    """vLLM's ``apply_penalties`` on the rows with a penalty: repetition over the prompt and
    the output (positive logits divided, the others multiplied), then ``frequency x count``
    and ``presence x present`` subtracted, counts over the output only. An output token still
    on the device (``History.pending_row``) is counted there, without reading it back."""
    penalized = [j for j, p in enumerate(params) if p.has_penalties]
    vocab_size = sub.shape[-1]
    rows, cols, pending_rows, sources = [], [], [], []
    for k, j in enumerate(penalized):
        output = histories[j].output_ids_on_host
        rows += [k] * len(output)
        cols += output
        if histories[j].pending_row is not None:
            pending_rows.append(k)
            sources.append(histories[j].pending_row)
    counts = sub.new_zeros(len(penalized), vocab_size)
    if rows:
        counts.view(-1).index_add_(0, _flat(rows, cols, vocab_size, upload), sub.new_ones(len(rows)))
    if pending_rows:
        both = upload([[k * vocab_size for k in pending_rows], sources], torch.int64)
        flat = both[0] + pending_ids.index_select(0, both[1])
        counts.view(-1).index_add_(0, flat, sub.new_ones(len(pending_rows)))
    seen = counts > 0
    index = upload(penalized, torch.int64)
    logits = sub.index_select(0, index)
    repeating = [k for k, j in enumerate(penalized) if params[j].repetition_penalty != 1.0]
    if repeating:
        in_prompt = torch.zeros_like(seen)
        prompt_rows = [k for k in repeating for _ in histories[penalized[k]].prompt_ids]
        prompt_cols = [t for k in repeating for t in histories[penalized[k]].prompt_ids]
        if prompt_rows:
            in_prompt.view(-1).index_fill_(0, _flat(prompt_rows, prompt_cols, vocab_size, upload), True)
        repetition = upload([params[j].repetition_penalty for j in penalized], sub.dtype)[:, None]
        penalties = torch.where(in_prompt | seen, repetition, 1.0)
        logits *= torch.where(logits > 0, 1.0 / penalties, penalties)
    frequency = upload([params[j].frequency_penalty for j in penalized], sub.dtype)
    presence = upload([params[j].presence_penalty for j in penalized], sub.dtype)
    logits -= frequency[:, None] * counts
    logits -= presence[:, None] * seen
    sub.index_copy_(0, index, logits)


def _mask_min_p(scaled: torch.Tensor, params: list[SamplingParams], upload: Upload) -> torch.Tensor:
    """Set to -inf the logits of tokens less than ``min_p`` times as likely as the row's most
    likely one: p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p). Rows with min_p 0
    keep everything (log 0 = -inf)."""
    min_p = upload([p.min_p for p in params], scaled.dtype)
    floor = scaled.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return scaled.masked_fill(scaled < floor, float("-inf"))


def _mask_sorted(sorted_logits: torch.Tensor, params: list[SamplingParams], upload: Upload) -> torch.Tensor:
    """Set to -inf the descending-sorted logits outside each row's top-k and then its nucleus."""
    vocab_size = sorted_logits.shape[-1]
    device = sorted_logits.device
    top_k = upload([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
    top_p = upload([p.top_p for p in params], torch.float32)
    ranks = torch.arange(vocab_size, device=device)[None, :]
    masked = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    # A token is outside the nucleus when the tokens before it already reach top_p. Rows with
    # top_p == 1 are exempt: rounding can push the cumulative mass to 1.0 before the tail ends.
    mass_before = probs.cumsum(dim=-1) - probs
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return masked.masked_fill(outside, float("-inf"))
