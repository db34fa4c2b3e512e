"""The baseline runner: the plain transformers forward with transformers' own ``DynamicCache``.

Same interface as :class:`alise.worker.model.runner.ModelRunner` (``execute(chunks)`` returns float32
next-token logits ``[len(chunks), vocab]``), so the engine and the whole serving stack run unchanged
on top of it, and a serving benchmark can compare the two forwards end to end. It does what a
simple transformers server with batching does:

- prefill chunks run one sequence at a time (batch 1) against that sequence's own cache;
- all decode tokens of a step run as ONE batched forward: the sequences' caches are left-padded to
  a common length, with a 2-D attention mask hiding the padding and explicit position ids. While
  the set of decoding sequences stays the same (same ids, same order), the batched cache is reused
  step after step as ``generate`` would (``DynamicCache`` appends by concatenation); when it
  changes, a new padded cache is built from the old one's rows (one ``index_select`` per layer)
  and the new sequences' own caches.

Per-sequence state is keyed by ``seq_ids`` when the engine passes them, else by the first block id
of the chunk's block table. A chunk with ``start_pos == 0`` always starts its sequence over (a
recompute after a drop); any other chunk must continue exactly where its cache ends.
:meth:`release` forgets a sequence (the engine calls it when the sequence's blocks are released).

The paged :class:`KVCache` is not used for attention: ``kv_cache`` is a placeholder of one layer,
one head of 32 channels, so that the engine's block accounting and KV moves (swap, quantize) run on
something cheap. Those moves do not shrink the transformers cache, which stays on the device in
full precision until the sequence is released.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache, KVShape
from alise.worker.model.loader import LoadedModel
from alise.worker.model.runner import RunnerBase

_PLACEHOLDER_SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=32)


@dataclass
class _DecodeBatch:
    """A left-padded batched cache: row ``i`` holds ``ids[i]``'s K/V in its last ``length`` columns."""

    ids: tuple[object, ...]
    cache: DynamicCache
    mask: torch.Tensor  # [B, width] int64, 1 on real positions

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclass
class _SeqState:
    """One sequence's K/V: its own batch-1 cache, or a row of the current decode batch."""

    length: int
    cache: DynamicCache | None = None
    batch: _DecodeBatch | None = None
    row: int = -1


class TransformersRunner(RunnerBase):
    """Runs ``loaded.model``'s own forward with per-sequence transformers caches (see the module doc)."""

    def __init__(self, loaded: LoadedModel, *, num_blocks: int, block_size: int, **ignored: object) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.kv_cache = KVCache(_PLACEHOLDER_SHAPE, num_blocks=num_blocks, block_size=block_size,
                                dtype=loaded.dtype, device=loaded.device)
        params = inspect.signature(self.model.forward).parameters
        # transformers renames past_key_values to cache (5.2x, old name deprecated); accept both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._seqs: dict[object, _SeqState] = {}
        self._batch: _DecodeBatch | None = None


    @property
    def num_cached_seqs(self) -> int:
        return len(self._seqs)

    def release(self, seq_id: object) -> None:
        """Forgets a sequence's cache (no-op for an unknown id)."""
        state = self._seqs.pop(seq_id, None)
        if state is not None and state.batch is self._batch and self._batch is not None:
            if not any(s.batch is self._batch for s in self._seqs.values()):
                self._batch = None

    def execute(self, chunks: list[SeqChunk], *, seq_ids: list[str] | None = None) -> torch.Tensor:
        """One step: prefills one by one, then every decode token in one batched forward."""
        if not chunks:
            raise ValueError("execute needs at least one chunk")
        if seq_ids is not None and len(seq_ids) != len(chunks):
            raise ValueError(f"{len(seq_ids)} seq_ids for {len(chunks)} chunks")
        keys = list(seq_ids) if seq_ids is not None else [("block", c.block_table[0]) for c in chunks]
        if len(set(keys)) != len(keys):
            raise ValueError("a sequence appears twice in one step")
        out = torch.empty((len(chunks), self.vocab_size), dtype=torch.float32, device=self.device)
        decode = []
        with torch.inference_mode():
            for i, (key, chunk) in enumerate(zip(keys, chunks, strict=True)):
                self._check(i, chunk)
                if chunk.start_pos == 0:
                    self.release(key)
                state = self._seqs.get(key)
                have = state.length if state is not None else 0
                if have != chunk.start_pos:
                    raise ValueError(f"chunk {i}: start_pos {chunk.start_pos} but {have} positions are cached")
                if len(chunk.token_ids) == 1 and state is not None:
                    decode.append(i)
                else:
                    out[i] = self._prefill(key, chunk)
            if decode:
                out[decode] = self._decode([keys[i] for i in decode], [chunks[i] for i in decode])
        return out

    def _check(self, i: int, chunk: SeqChunk) -> None:
        n = len(chunk.token_ids)
        if n == 0:
            raise ValueError(f"chunk {i} has no tokens")
        if chunk.start_pos < 0 or chunk.start_pos + n > self.max_model_len:
            raise ValueError(f"chunk {i}: positions [{chunk.start_pos}, {chunk.start_pos + n}) "
                             f"outside [0, {self.max_model_len})")
        if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= self.vocab_size:
            raise ValueError(f"chunk {i}: token ids must be in [0, {self.vocab_size})")

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """The model's own forward; returns float32 logits of each row's last token."""
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1].float()

    def _prefill(self, key: object, chunk: SeqChunk) -> torch.Tensor:
        state = self._seqs.get(key)
        if state is None:
            state = self._seqs[key] = _SeqState(length=0, cache=DynamicCache())
        elif state.batch is not None:
            self._materialize(state)
        end = chunk.start_pos + len(chunk.token_ids)
        ids = torch.tensor([chunk.token_ids], dtype=torch.int64, device=self.device)
        positions = torch.arange(chunk.start_pos, end, dtype=torch.int64, device=self.device)[None]
        mask = torch.ones((1, end), dtype=torch.int64, device=self.device)
        logits = self._forward(ids, mask, positions, state.cache)
        state.length = end
        return logits[0]

    def _decode(self, keys: list[object], chunks: list[SeqChunk]) -> torch.Tensor:
        batch = self._batch
        states = [self._seqs[k] for k in keys]
        reuse = (batch is not None and batch.ids == tuple(keys)
                 and all(s.batch is batch and s.row == r for r, s in enumerate(states)))
        if not reuse:
            batch = self._build_batch(keys, states)
        ones = torch.ones((len(keys), 1), dtype=batch.mask.dtype, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        ids = torch.tensor([[c.token_ids[0]] for c in chunks], dtype=torch.int64, device=self.device)
        positions = torch.tensor([[s.length] for s in states], dtype=torch.int64, device=self.device)
        logits = self._forward(ids, batch.mask, positions, batch.cache)
        for s in states:
            s.length += 1
        return logits

    def _build_batch(self, keys: list[object], states: list[_SeqState]) -> _DecodeBatch:
        """A new left-padded cache for ``keys``: rows of the old batch move by one gather per layer."""
        old = self._batch
        for key, state in self._seqs.items():  # leaving the old batch but not released: keep their rows
            if old is not None and state.batch is old and key not in keys:
                self._materialize(state)
        width = max(s.length for s in states)
        rows = [r for r, s in enumerate(states) if s.batch is not None]
        own = [r for r, s in enumerate(states) if s.batch is None]
        mask = torch.zeros((len(keys), width), dtype=torch.int64, device=self.device)
        for r, s in enumerate(states):
            mask[r, width - s.length:] = 1
        layers = []
        first = states[own[0]].cache if own else old.cache
        for layer_idx in range(len(first.layers)):
            k_like = first.layers[layer_idx].keys
            v_like = first.layers[layer_idx].values
            k = k_like.new_zeros((len(keys), k_like.shape[1], width, k_like.shape[3]))
            v = v_like.new_zeros((len(keys), v_like.shape[1], width, v_like.shape[3]))
            if rows:
                # Left padding: the old rows' last m columns are the new rows' last m columns.
                m = min(old.width, width)
                src = torch.tensor([states[r].row for r in rows], dtype=torch.int64, device=self.device)
                dst = torch.tensor(rows, dtype=torch.int64, device=self.device)
                layer = old.cache.layers[layer_idx]
                k[:, :, width - m:].index_copy_(0, dst, layer.keys.index_select(0, src)[:, :, old.width - m:])
                v[:, :, width - m:].index_copy_(0, dst, layer.values.index_select(0, src)[:, :, old.width - m:])
            for r in own:
                s = states[r]
                layer = s.cache.layers[layer_idx]
                k[r, :, width - s.length:] = layer.keys[0]
                v[r, :, width - s.length:] = layer.values[0]
            layers.append((k, v))
        batch = _DecodeBatch(ids=tuple(keys), cache=DynamicCache(layers), mask=mask)
        for r, s in enumerate(states):
            s.batch, s.row, s.cache = batch, r, None
        self._batch = batch
        return batch

    def _materialize(self, state: _SeqState) -> None:
        """Copies a batch row out into the sequence's own batch-1 cache."""
        batch = state.batch
        start = batch.width - state.length
        state.cache = DynamicCache([
            (layer.keys[state.row:state.row + 1, :, start:].clone(),
             layer.values[state.row:state.row + 1, :, start:].clone())
            for layer in batch.cache.layers])
        state.batch, state.row = None, -1
