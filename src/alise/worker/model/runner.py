"""The forward pass of every served family over the paged KV cache, for a whole batch in one go.

A step is a list of :class:`SeqChunk` (prefill chunks and single decode tokens, freely mixed).
Their tokens are flattened into one ``[T, hidden]`` batch, so every linear layer runs once over all
of them; only attention splits by sequence (see :mod:`alise.worker.model.attention`). What the layers
compute is the model's :class:`DecoderSpec` (:mod:`alise.worker.model.families`), run by the one decoder
forward of :mod:`alise.worker.model.decoder` (OPT keeps its own); the layers reuse the Hugging Face
module's parameters in place: nothing is copied, and a checkpoint loads the usual way.

Invariant kept across steps: after ``execute``, the K/V of every fed token sits in its sequence's
pages, so the next chunk of that sequence starts at ``start_pos + len(token_ids)``. The engine owns
block tables and positions; the runner trusts nothing and validates both.

Fast path on CUDA: Q/K/V (and the gate/up) projections run as one fused matmul each (the HF
modules' weights become views into the fused tensor, so the HF model still works and shares
them), attention uses the Triton backend, and the layer ops follow a :class:`KernelPlan` chosen at
start-up (:mod:`alise.worker.model.tuning`: residual add fused with the next norm, rotary fused with the
page write, the matmul backend per shape, the decode kernel's split-K, the unified attention
kernel for every step that is not all decodes). Pure-decode steps replay CUDA graphs captured per
batch-size bucket and mixed steps (chunks at any position beside decodes) graphs per token and
sequence bucket (:mod:`alise.worker.model.cuda_graphs`); longer steps run eagerly, and so does every
step of a model with routed experts (their grouping reads counts back to the host). On the CPU
the same code runs with the torch reference backend, the default plan and no graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from alise.worker.model.attention import (
    CUDNN_MIN_ROWS,
    MIN_BATCHED_FRESH,
    TORCH_BACKEND,
    AttentionBackend,
    Upload,
    build_attention_metadata,
    triton_backend,
)
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.cuda_graphs import DecodeGraphs, MixedGraphs
from alise.worker.model.decoder import DecoderPass, bind, rope_tables
from alise.worker.model.families import describe
from alise.worker.model.kernel_plan import KernelPlan, LayerOps
from alise.worker.model.kv_cache import KVCache, KVShape
from alise.worker.model.kv_cache import kv_cache_dtype as kv_cache_dtype_of
from alise.worker.model.loader import LoadedModel
from alise.worker.model.overlap import TokenGather
from alise.worker.model.tp_shard import local_spec

logger = logging.getLogger(__name__)


class RunnerBase:
    """What the engine reads off any runner: the cache's geometry and the model's limits.
    Subclasses set ``kv_cache``, ``config`` and ``loaded``."""

    kv_cache: KVCache
    loaded: LoadedModel

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len


class ModelRunner(RunnerBase, DecoderPass):
    """Runs a :class:`LoadedModel` over a :class:`KVCache` of ``num_blocks`` blocks of ``block_size``."""

    def __init__(self, loaded: LoadedModel, *, num_blocks: int, block_size: int,
                 attention_backend: str = "auto", use_cuda_graphs: bool | None = None,
                 max_num_seqs: int = 64, max_num_tokens: int = 512, fast_kernels: bool | None = None,
                 plan_file: str = "", kv_cache_dtype: str = "auto") -> None:
        """``attention_backend``: "torch" (reference), "triton" (CUDA), or "auto" (Triton on CUDA when
        available). ``fast_kernels`` (default: on with the Triton backend) checks and times the
        fused kernels on this device now and keeps the fastest per shape (alise.worker.model.tuning).
        ``use_cuda_graphs`` (default: on with the Triton backend) captures decode graphs for up to
        ``max_num_seqs`` sequences and, where the unified kernel passed its check, mixed-step
        graphs for up to ``max_num_tokens`` rows (0: none). ``plan_file``: where the kernel plan is
        kept: a plan made there for this device, model and sizes is used as it is (no checks or
        timings at start-up), else the plan made now is written there. ``kv_cache_dtype``: the
        pages' dtype by vLLM's name ("auto": the model's; "fp8_e4m3": alise.worker.model.kv_cache)."""
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        #: What the forward computes (alise.worker.model.families); refuses what it cannot compute exactly.
        self.spec = describe(loaded.config, loaded.max_model_len)
        #: This rank of a tensor-parallel replica (None: the whole model on one device).
        self.tp = loaded.tp
        page_dtype = kv_cache_dtype_of(kv_cache_dtype, loaded.dtype)
        if self.tp is None:
            self.kv_cache = KVCache.from_config(loaded.config, num_blocks=num_blocks, block_size=block_size,
                                                dtype=page_dtype, device=loaded.device)
        else:  # this rank's heads, and the KV heads they read
            self.spec = local_spec(self.spec, self.tp.rank, self.tp.world_size)
            self.kv_cache = KVCache(KVShape(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim),
                                    num_blocks=num_blocks, block_size=block_size, dtype=page_dtype,
                                    device=loaded.device)
        self._head_dim = self.kv_cache.shape.head_dim
        if max_num_seqs < 1 or max_num_tokens < 0 or max_num_tokens == 1:
            raise ValueError(f"max_num_seqs must be >= 1 and max_num_tokens 0 or >= 2, got {max_num_seqs} "
                             f"and {max_num_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.attention_backend = _pick_backend(attention_backend, self.device)
        #: Fresh prompts in a step from which they share one attention call per layer; 0:
        #: never. On by default on CUDA, where a step with prefills runs eagerly and the padded
        #: call saves launches (H200: 4 prompts of 50 beside 58 decodes 36.1 vs 43.6 ms a
        #: step); off on the CPU, where it measured slower (alise.worker.model.attention). Unused
        #: where the unified kernel runs those steps.
        self.min_batched_fresh = MIN_BATCHED_FRESH if loaded.device.type == "cuda" else 0
        if self.device.type == "cuda":
            # Prefill attention sees a new (query, key) length nearly every step; cuDNN's SDPA
            # builds an execution plan per new shape (bench/gpu/mixed_steps.py measures it), the
            # flash and memory-efficient kernels do not. A worker-wide setting, as the runner
            # owns the process's GPU work; long fresh prompts may still run cuDNN, padded to a
            # few lengths, where the kernel plan measured it faster (attention.padded_lengths).
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._bind_model()
        if fast_kernels is None:
            fast_kernels = self.attention_backend.name == "triton"
        loaded_plan = False
        if fast_kernels:
            from alise.worker.model.tuning import plan_kernels, warm_cudnn_fresh

            cached = self._load_plan(plan_file, max_num_seqs) if plan_file else None
            loaded_plan = cached is not None
            self.ops.plan = cached or plan_kernels(self)
            if self.tp is not None:  # the plan decides the padded shapes of the collectives
                from alise.worker.model.kernel_plan import plan_from_json, plan_to_json

                key = self._plan_key(max_num_seqs)
                self.ops.plan = plan_from_json(self.tp.agree(plan_to_json(self.plan, key)), key)
                loaded_plan = self.tp.agree(loaded_plan)
            warm_cudnn_fresh(self, self.plan)  # a kept or agreed plan's cuDNN plans, built before any step
        if use_cuda_graphs is None:
            use_cuda_graphs = self.attention_backend.name == "triton" and not self.spec.has_moe
            if self.spec.has_moe and self.attention_backend.name == "triton":
                logger.info("%s routes tokens to experts (host read-back per layer): steps run eagerly, "
                            "no CUDA graphs", loaded.name)
        self.decode_graphs = None
        self.mixed_graphs = None
        if use_cuda_graphs:
            self._capture_graphs(measure=fast_kernels and not loaded_plan, loaded_plan=loaded_plan)
        if fast_kernels and plan_file and not loaded_plan and (self.tp is None or self.tp.is_driver):
            from alise.worker.model.kernel_plan import plan_to_json

            Path(plan_file).write_text(plan_to_json(self.plan, self._plan_key(max_num_seqs)), encoding="utf-8")

    def _bind_model(self) -> None:
        """The HF model's weights as the spec's forward reads them (alise.worker.model.decoder.bind),
        its rotary tables, and the layer ops (default plan) for its norm and activation."""
        self._body, self._weights = bind(self.model, self.spec)
        self._qkv = [w.qkv for w in self._weights]
        self._rope = rope_tables(self._body, self.spec, self.max_model_len, self.device, self.loaded.dtype)
        self._forward = self._forward_opt if self.spec.family == "opt" else self._forward_decoder
        self.ops = LayerOps(norm_kind=self.spec.norm, activation=self.spec.activation)

    def _capture_graphs(self, *, measure: bool, loaded_plan: bool) -> None:
        """Decode graphs, then mixed-step graphs where the plan has the unified kernel."""
        if self.attention_backend.name != "triton":
            raise ValueError("CUDA graphs need the triton attention backend (its kernels never sync the host)")
        if self.spec.has_moe:
            raise ValueError(f"CUDA graphs cannot capture {self.loaded.name}'s routed experts (they read expert "
                             f"counts back to the host); run it without graphs")
        self.decode_graphs = self.make_decode_graphs(self.max_num_seqs)
        pool = self.decode_graphs.capture()
        if self.ops.plan.unified and self.max_num_tokens:
            # Under tensor parallelism every rank keeps every bucket: a rank's own timings would
            # keep others than its peers', and a graph pads a step to its bucket's shape.
            self._capture_mixed_graphs(pool, measure=measure and self.tp is None)
            if self.tp is not None and not self.tp.min_over_ranks(int(self.mixed_graphs is not None)):
                self.mixed_graphs = None
            if loaded_plan and self.mixed_graphs is not None:
                self.mixed_graphs.drop_tokens(list(self.plan.mixed_graph_tokens))
                if not self.plan.mixed_graph_tokens:
                    self.mixed_graphs = None

    def _plan_key(self, max_num_seqs: int) -> dict:
        """What a kept kernel plan must have been made for."""
        import triton

        c = self.config
        return dict(device=torch.cuda.get_device_name(self.device), torch=torch.__version__,
                    triton=triton.__version__, dtype=str(self.loaded.dtype), kv_dtype=str(self.kv_cache.dtype),
                    family=self.spec.family,
                    norm=self.spec.norm, activation=self.spec.activation,
                    hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                    head_dim=self._head_dim, kv_heads=self.kv_cache.shape.num_kv_heads,
                    max_num_seqs=max_num_seqs, max_num_tokens=self.max_num_tokens, block_size=self.block_size)

    def _load_plan(self, plan_file: str, max_num_seqs: int) -> KernelPlan | None:
        from alise.worker.model.kernel_plan import plan_from_json

        path = Path(plan_file)
        if not path.exists():
            return None
        plan = plan_from_json(path.read_text(encoding="utf-8"), self._plan_key(max_num_seqs))
        logger.info("kernel plan %s: %s", plan_file, "kept" if plan else "made for another set-up; planning again")
        return plan

    def _capture_mixed_graphs(self, pool, *, measure: bool) -> None:
        """Mixed-step graphs over the decode graphs' pool; with ``measure``, each token bucket kept
        only where its graph matches and beats the eager step. A capture that fails leaves
        mixed steps eager (the log says why)."""
        try:
            self.mixed_graphs = self.make_mixed_graphs()
            self.mixed_graphs.capture(pool)
        except Exception as exc:  # a fast path, never a reason not to serve
            logger.warning("mixed-step graphs not captured (%s: %s); mixed steps run eagerly", type(exc).__name__, exc)
            self.plan.report.append(f"mixed-step graphs: capture failed ({type(exc).__name__}); eager")
            self.mixed_graphs = None
            return
        if measure:
            from alise.worker.model.tuning import keep_faster_mixed_graphs

            keep_faster_mixed_graphs(self)

    @property
    def plan(self) -> KernelPlan:
        return self.ops.plan

    def make_decode_graphs(self, max_num_seqs: int) -> DecodeGraphs:
        """Static-buffer decode steps for up to ``max_num_seqs`` sequences (not yet captured)."""
        return DecodeGraphs(lambda ids, meta: self._logits(self._forward(ids, meta)), max_batch=max_num_seqs,
                            width=self._table_width, block_size=self.block_size, device=self.device,
                            options_for=self.plan.decode_options)

    def make_mixed_graphs(self, tokens: list[int] | None = None) -> MixedGraphs:
        """Static-buffer mixed steps for up to ``max_num_tokens`` rows (not yet captured)."""
        return MixedGraphs(self._mixed_forward, max_tokens=self.max_num_tokens, max_seqs=self.max_num_seqs,
                           width=self._table_width, block_size=self.block_size, vocab_size=self.vocab_size,
                           dtype=self.loaded.dtype, device=self.device, tokens=tokens,
                           config_for=lambda t: self.plan.unified_config(t))

    @property
    def _table_width(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def execute(self, chunks: list[SeqChunk], *, all_logits: bool = False, seq_ids: list[str] | None = None,
                gather: TokenGather | None = None, upload: Upload | None = None) -> torch.Tensor | list[torch.Tensor]:
        """One forward step over ``chunks``; writes their K/V and returns float32 logits.

        Default: ``[num_wanted, vocab]``, the logits after the last token of each chunk whose
        ``needs_logits`` is set (all by default), in chunk order. ``all_logits=True``: a list with
        ``[len(token_ids), vocab]`` per chunk. ``seq_ids`` is ignored: the block tables are all
        the per-sequence state this runner needs. ``gather``: input ids still on the device (an
        overlapped step's decode rows take the ids the step before sampled; their ``token_ids``
        are placeholders), written over the uploaded ids in stream order before the forward.
        ``upload(values, dtype)``: how an eager step's host-built inputs (ids, logit rows,
        attention metadata) reach the device; an overlapped step passes pinned non-blocking
        copies (a pageable copy would wait for the step ahead). Default: ``.to(device)``.
        """
        self._validate(chunks)
        wants = [c.needs_logits for c in chunks]
        if not all_logits:
            if self.decode_graphs is not None and all(wants) and self.decode_graphs.can_run(chunks):
                return self.decode_graphs.run(chunks, gather)
            if self.mixed_graphs is not None and self.mixed_graphs.can_run(chunks):
                return self.mixed_graphs.run(chunks, wants, gather)
        num_tokens = [len(c.token_ids) for c in chunks]
        if self.plan.cudnn_fresh_lengths and max(num_tokens) > CUDNN_MIN_ROWS:
            from alise.worker.model.tuning import warm_cudnn_fresh

            warm_cudnn_fresh(self, self.plan)  # this thread's cuDNN plans (torch keeps them per thread)
        meta = build_attention_metadata([c.start_pos for c in chunks], num_tokens,
                                        [c.block_table for c in chunks], block_size=self.block_size,
                                        device=self.device, min_batched_fresh=self.min_batched_fresh,
                                        unified_config=self.plan.unified_config(sum(num_tokens)), upload=upload,
                                        cudnn_fresh_lengths=self.plan.cudnn_fresh_lengths)
        ids = [t for c in chunks for t in c.token_ids]
        if upload is None:
            input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device)
        else:
            input_ids = upload(ids, torch.int64)
        if gather is not None:
            gather.apply(input_ids)
        with torch.inference_mode():
            hidden = self._forward(input_ids, meta)
            if all_logits:
                return list(self._logits(hidden).split(num_tokens))
            ends = np.cumsum(num_tokens) - 1
            last_rows = torch.from_numpy(ends[np.asarray(wants, dtype=bool)])
            last_rows = last_rows.to(self.device) if upload is None else upload(last_rows, torch.int64)
            return self._logits(hidden.index_select(0, last_rows))

    def release(self, seq_id: str) -> None:
        """Nothing to forget: a sequence's K/V lives in the blocks that the engine frees."""

    def _validate(self, chunks: list[SeqChunk]) -> None:
        if not chunks:
            raise ValueError("execute needs at least one chunk")
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            end_pos = chunk.start_pos + n
            if n == 0:
                raise ValueError(f"chunk {i} has no tokens")
            if chunk.start_pos < 0:
                raise ValueError(f"chunk {i}: start_pos must be >= 0, got {chunk.start_pos}")
            if end_pos > self.max_model_len:
                raise ValueError(f"chunk {i}: positions up to {end_pos} exceed max_model_len {self.max_model_len}")
            if len(chunk.block_table) * self.block_size < end_pos:
                raise ValueError(f"chunk {i}: block table of {len(chunk.block_table)} blocks x {self.block_size} "
                                 f"tokens cannot hold {end_pos} positions")
            if min(chunk.block_table) < 0 or max(chunk.block_table) >= self.num_blocks:
                raise ValueError(f"chunk {i}: block ids must be in [0, {self.num_blocks}), "
                                 f"got {min(chunk.block_table)}..{max(chunk.block_table)}")
            if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= self.vocab_size:
                raise ValueError(f"chunk {i}: token ids must be in [0, {self.vocab_size}), "
                                 f"got {min(chunk.token_ids)}..{max(chunk.token_ids)}")


def _pick_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    if name not in ("auto", "triton"):
        raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {name!r}")
    from alise.worker.kernels import triton_attention

    if device.type == "cuda" and triton_attention.is_available():
        return triton_backend()
    if name == "triton":
        raise ValueError(f"the triton attention backend needs Triton and a CUDA device, got {device}")
    return TORCH_BACKEND
