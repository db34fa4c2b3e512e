"""Next-token sampling for a batch, each row with its own parameters and random stream.

Filtering runs vectorized on the logits' device: temperature scaling, then min-p (tokens less
than ``min_p`` times as likely as the most likely one are dropped: in logits, those more than
``-log(min_p)`` below the row's largest), then top-k, then top-p over the surviving tokens (the
nucleus: the fewest most-likely tokens whose mass reaches ``top_p``). The most likely token
always survives every filter; vLLM applies them in the same order. The draw is an exponential
race over the vocabulary: a seeded request takes its noise from its own generator, so its tokens
depend only on its seed and its logits, never on its batch-mates. Greedy rows (temperature 0, or
top_k 1) take the
argmax and draw nothing. The returned Python list is the step's only host sync
(``sample_ids`` returns the ids on the device, for a step that reads them back later).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alise.core.sampling import SamplingParams

#: ``upload(values, dtype)``: the values as a tensor on the logits' device.
Upload = Callable[[Sequence, torch.dtype], torch.Tensor]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (any value in ``[0, 2**64)``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless: all per-request state is in the params and generators passed to :meth:`sample`."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """One token id per row of ``logits [n, vocab]`` (float32).

        ``generators[i]`` is row i's random stream (None: the global torch RNG). It must live on
        ``logits.device``.
        """
        return self.sample_ids(logits, params, generators).tolist()

    def sample_ids(self, logits: torch.Tensor, params: list[SamplingParams],
                   generators: list[torch.Generator | None], upload: Upload | None = None) -> torch.Tensor:
        """:meth:`sample`'s ids as an int64 tensor on ``logits.device``, not read back.
        ``upload(values, dtype)`` puts the rows' parameters on the device (default:
        ``torch.tensor``, which waits for the device's queue on CUDA; an overlapped step passes
        pinned non-blocking copies, ``alise.worker.model.overlap.PinnedUploads``)."""
        device = logits.device
        if upload is None:
            def upload(values, dtype):
                return torch.tensor(values, dtype=dtype, device=device)
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"need one SamplingParams and one generator per row: {num_rows} rows, "
                             f"{len(params)} params, {len(generators)} generators")
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
    def _exponentials(generators: list[torch.Generator | None], like: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise shaped like ``like``, each row from its own generator where it has one."""
        noise = torch.empty_like(like)
        if any(g is None for g in generators):
            noise.exponential_()  # one launch for all rows; seeded rows are overwritten below
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return noise


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
