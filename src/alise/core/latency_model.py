"""Execution-time model of one worker: what a prefill and a decode step cost.

The paper fits prefill time linear in prompt length and decode time per token linear in
context length. Under continuous batching a decode step's cost depends on the batch: it
reads the weights once (a fixed cost), then per sequence does a little compute and reads
that sequence's KV cache (linear in its context). So a step costs

    T_step = c0 + c_seq * num_seqs + c_ctx * total_context_tokens + c_pre * prefill_tokens
             + c_pre2 * sum(n * (2 * start + n))
             + [any prefill] * (c_mixed + c_chunk * num_prefill_chunks + [any decode row] * c_mixed_decode)

with the quadratic prefill term for attention: a chunk of ``n`` tokens fed from position
``start`` (chunked prefill feeds a prompt in pieces) has query ``i`` attend to ``start + i``
keys, twice the work ``n * (2 * start + n) / 2``; a whole prompt (``start = 0``) costs
``c_pre2 * n ** 2``. The last two terms are what
an engine pays for carrying prefill chunks at all, whatever their length: a step with
prefills cannot replay a captured decode graph (``c_mixed``), each chunk adds its own
per-layer attention launches (``c_chunk``), and so do the decode rows beside them
(``c_mixed_decode``). None is in the paper's formula; all show on a GPU, where a decode step is
cheap and a 50-token prompt costs little compute, but a step with a few prompts beside a
decode batch runs eagerly, bound by kernel launches, at twice a decode step's time. The
coefficients come
from a profile the worker measures on its own device (least squares, non-negative) and are
refined online from step reports by an exponentially weighted correction factor.

A served step also pays for what happens around the forward pass: the worker's host work,
the plan/report round trip and the scheduler's planning (the "cycle" the scheduler logs).
``c_cycle_s`` adds that per step, outside the correction factor (which compares the worker's
measured forward time with the forward terms only). A worker's profile cannot see it and
leaves it 0; a profile for the simulator takes it from the cycle logs of a real run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace


@dataclass
class LatencyModel:
    c0_s: float = 1e-3
    c_seq_s: float = 1e-5
    c_ctx_s: float = 1e-8
    c_pre_s: float = 1e-5
    c_pre2_s: float = 0.0
    #: Measured-over-modelled step time, smoothed online (1.0 = the profile is exact).
    correction: float = 1.0
    name: str = "default"
    meta: dict = field(default_factory=dict)
    #: Per-step cost around the forward pass (host work, round trip, planning).
    c_cycle_s: float = 0.0
    #: Fixed cost of a step that carries any prefill chunk (no decode graph replay).
    c_mixed_s: float = 0.0
    #: Cost of each prefill chunk in a step, beyond its tokens.
    c_chunk_s: float = 0.0
    #: Fixed cost of decode rows in a step that also carries prefill chunks.
    c_mixed_decode_s: float = 0.0

    def with_kv_bytes_ratio(self, ratio: float) -> LatencyModel:
        """This model for KV pages of ``ratio`` times the bytes per token it was made with (fp8
        pages under a 16-bit profile: 0.5). A decode step reads each cached token's K and V
        once, so the per-context-token cost ``c_ctx_s`` scales with the bytes; the weights'
        read, prefill compute and fixed costs do not. ``meta["kv_bytes_ratio"]`` compounds."""
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        meta = dict(self.meta, kv_bytes_ratio=self.meta.get("kv_bytes_ratio", 1.0) * ratio)
        return replace(self, c_ctx_s=self.c_ctx_s * ratio, meta=meta)

    @property
    def measured(self) -> bool:
        """Whether the coefficients come from a profile (measured or loaded), not the defaults."""
        return self.name != "default"

    #: The coefficients, in :meth:`fit`'s column order (``c_cycle_s`` is not fitted).
    FITTED = ("c0_s", "c_seq_s", "c_ctx_s", "c_pre_s", "c_pre2_s", "c_mixed_s", "c_chunk_s", "c_mixed_decode_s")

    def step_s(self, num_seqs: int, total_context: int, prefill_lens: Sequence[int] = (),
               prefill_starts: Sequence[int] = ()) -> float:
        return self.forward_s(num_seqs, total_context, prefill_lens, prefill_starts) + self.c_cycle_s

    def forward_s(self, num_seqs: int, total_context: int, prefill_lens: Sequence[int] = (),
                  prefill_starts: Sequence[int] = ()) -> float:
        """The forward pass and sampling of a step, as the worker times it. ``prefill_lens``:
        the multi-token chunks' lengths; ``prefill_starts``: their start positions (default 0)."""
        return self.forward_base_s(num_seqs, total_context, prefill_lens, prefill_starts) * self.correction

    def forward_base_s(self, num_seqs: int, total_context: int, prefill_lens: Sequence[int] = (),
                       prefill_starts: Sequence[int] = ()) -> float:
        """``forward_s`` before the online correction: the one formula of a step's cost."""
        if not prefill_lens:  # NOTE: the prefill terms add 0.0 here (finite coefficients >= 0)
            return self.c0_s + self.c_seq_s * num_seqs + self.c_ctx_s * total_context
        starts = prefill_starts or (0,) * len(prefill_lens)
        base = (
            self.c0_s
            + self.c_seq_s * num_seqs
            + self.c_ctx_s * total_context
            + self.c_pre_s * sum(prefill_lens)
            + self.c_pre2_s * sum(n * (2 * s + n) for n, s in zip(prefill_lens, starts, strict=True))
        )
        if prefill_lens:
            base += self.c_mixed_s + self.c_chunk_s * len(prefill_lens)
            if num_seqs > len(prefill_lens):
                base += self.c_mixed_decode_s
        return base

    def chunk_allowance(self, num_seqs: int, total_context: int, ratio: float) -> int | None:
        """Most prompt tokens one chunk may add to a decode step of ``num_seqs`` sequences and
        ``total_context`` tokens so that the step costs at most ``ratio`` times the decode step
        alone, by this model; None: no limit (no decodes to protect, or a model that does not
        price prefill tokens)."""
        per_token = self.c_pre_s + self.c_ctx_s
        if num_seqs < 1 or per_token <= 0 or ratio <= 1:
            return None
        alone = self.forward_base_s(num_seqs, total_context)
        room = (ratio - 1) * alone - (self.c_seq_s + self.c_mixed_s + self.c_chunk_s + self.c_mixed_decode_s)
        if room <= 0:
            return 0
        if self.c_pre2_s > 0:  # c_pre2 t^2 + per_token t = room (a chunk from position 0)
            return int((-per_token + math.sqrt(per_token ** 2 + 4 * self.c_pre2_s * room)) / (2 * self.c_pre2_s))
        return int(room / per_token)

    def recompute_base_s(self, num_tokens, num_computed=0):
        """Uncorrected cost of feeding a sequence of ``num_tokens`` from ``num_computed`` on, as
        a step of its own (``forward_base_s(1, num_tokens, [n], [num_computed])``). Written with
        plain arithmetic so it takes numpy arrays as well as numbers."""
        n = num_tokens - num_computed
        return (self.c0_s + self.c_seq_s + self.c_mixed_s + self.c_chunk_s + self.c_ctx_s * num_tokens
                + self.c_pre_s * n + self.c_pre2_s * n * (2 * num_computed + n))

    def decode_member_base_s(self, context, batch_size: int):
        """Uncorrected marginal cost of one member of a decode batch of ``batch_size`` at
        ``context`` tokens (numbers or numpy arrays): its share of the fixed cost, plus its own."""
        return self.c0_s / max(batch_size, 1) + self.c_seq_s + self.c_ctx_s * context

    def prefill_s(self, num_tokens: int) -> float:
        """Time to prefill one prompt alone (T_pre(s) of the paper)."""
        return self.step_s(1, num_tokens, (num_tokens,))

    def decode_token_s(self, context: int, batch_size: int = 1) -> float:
        """Marginal cost one sequence adds to a decode step in a batch of ``batch_size``.

        The fixed per-step cost is shared by the batch, so each member is charged
        c0 / batch_size plus its own per-sequence and per-context terms.
        """
        return (self.decode_member_base_s(context, batch_size) * self.correction
                + self.c_cycle_s / max(batch_size, 1))

    def observe_step(self, measured_s: float, num_seqs: int, total_context: int,
                     prefill_lens: Sequence[int] = (), prefill_starts: Sequence[int] = (),
                     weight: float = 0.05) -> None:
        """Online refinement from a worker's step report."""
        predicted = self.forward_base_s(num_seqs, total_context, prefill_lens, prefill_starts)
        if predicted <= 0 or not math.isfinite(measured_s) or measured_s <= 0:
            return
        ratio = min(max(measured_s / predicted, 0.1), 10.0)
        self.correction = (1 - weight) * self.correction + weight * ratio

    @classmethod
    def fit(cls, samples: Sequence[tuple], name: str = "fitted",
            meta: dict | None = None, *, relative: bool = True) -> LatencyModel:
        """Non-negative least squares over (num_seqs, total_context, prefill_lens, seconds) or
        (num_seqs, total_context, prefill_lens, seconds, prefill_starts).

        ``relative``: minimise relative errors, so that short steps count as much as long ones
        (a profile's grid of points); else absolute ones, so that the fitted times add up to the
        measured total (the steps of a serving run, where the total busy time is what matters)."""
        import numpy as np
        from scipy.optimize import nnls

        rows = []
        targets = []
        for num_seqs, total_context, prefill_lens, seconds, *rest in samples:
            starts = rest[0] if rest and rest[0] else (0,) * len(prefill_lens)
            mixed = bool(prefill_lens)
            rows.append([1.0, num_seqs, total_context, sum(prefill_lens),
                         sum(n * (2 * s + n) for n, s in zip(prefill_lens, starts, strict=True)),
                         float(mixed), len(prefill_lens), float(mixed and num_seqs > len(prefill_lens))])
            targets.append(seconds)
        a = np.asarray(rows, dtype=np.float64)
        b = np.asarray(targets, dtype=np.float64)
        w = 1.0 / np.maximum(b, 1e-6) if relative else np.ones_like(b)
        coef, _ = nnls(a * w[:, None], b * w)
        return cls(**dict(zip(cls.FITTED, map(float, coef), strict=True)), name=name, meta=dict(meta or {}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        model = cls(**known)
        for key in (*cls.FITTED, "correction", "c_cycle_s"):
            value = getattr(model, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"latency profile field {key} must be a finite number >= 0, got {value!r}")
        return model

    @classmethod
    def load(cls, path: str) -> LatencyModel:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())
