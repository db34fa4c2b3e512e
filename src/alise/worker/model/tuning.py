"""Start-up choice of kernels: check every fast kernel on this device, time it against the
alternatives per shape inside CUDA graphs, keep the fastest (a :class:`KernelPlan`).

Rules, in the order :func:`plan_kernels` applies them:

- A Triton kernel is used only after it has matched its torch reference on random data of the
  model's shapes and dtype on this device (``||out - ref|| / ||ref||`` within the dtype's
  rounding, every output written); a kernel that fails, or raises, is left out and the report
  says so. The plan's default for every piece is the torch path the runner had before.
- Timings are of CUDA graphs of several calls (no launch gaps), median of several replays, on
  random data (never zeros), per shape the runner will run: the decode and mixed-step buckets.
- After the graphs are captured, :func:`keep_faster_mixed_graphs` times each token bucket's
  mixed step replayed against the same step run eagerly and keeps only the graphs that win.

Every line of the report (checks, timings, choices) goes to the log and to ``plan.report``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from alise.worker.model import attention as ref
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.cuda_graphs import decode_buckets, token_buckets
from alise.worker.model.kernel_plan import (
    FUSED_ACTIVATIONS,
    KernelPlan,
    blas_library,
    norm_params,
    reference_norm,
    rotate_half,
    torch_linear,
)
from alise.worker.model.kv_cache import to_pages
from alise.worker.model.timing import fmt_us, graph_time_s, median_wall_s, rel_error

logger = logging.getLogger(__name__)

#: ||out - ref|| / ||ref|| a kernel may show against its float32 reference, by dtype.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: Context of the decode rows in representative steps (clamped to the model's limit).
CONTEXT = 512


class Planner:
    """Builds the plan of one runner (see the module docstring). ``timer(fn)`` gives the seconds of
    one call of ``fn``: graph-timed on CUDA; a wall clock runs the same decisions on the CPU under
    the Triton interpreter, which is how the tests exercise them."""

    def __init__(self, runner, timer: Callable[[Callable[[], object]], float] = graph_time_s) -> None:
        self.runner = runner
        self.time = timer
        self.plan = KernelPlan()
        self.dtype = runner.loaded.dtype
        self.device = runner.device
        self.tol = TOLERANCE[self.dtype]
        shape = runner.kv_cache.shape
        self.num_kv_heads, self.head_dim = shape.num_kv_heads, shape.head_dim
        self.num_heads = runner.spec.num_heads
        self.context = min(CONTEXT, runner.max_model_len - 1)

    def note(self, line: str) -> None:
        self.plan.report.append(line)
        logger.info("kernel plan: %s", line)

    def attempt(self, what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except Exception as exc:  # a kernel that does not build or run here is left out
            self.note(f"{what}: failed ({type(exc).__name__}: {str(exc)[:160]}); left out")
            return None

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ norms and rotary

    def pick_norm(self) -> None:
        from alise.worker.kernels.triton_fused import add_norm

        norm = self.runner._weights[0].input_norm
        kind = self.runner.spec.norm
        weight, bias, eps = norm_params(norm)
        if weight is None:
            self.note("add_norm: the norm has no weight; torch")
            return
        x, d = self.randn(64, weight.shape[0]), self.randn(64, weight.shape[0])
        total, out = add_norm(x, d, weight, bias, eps, kind=kind)
        expect = x + d
        err = max(rel_error(total, expect), rel_error(out, reference_norm(expect, weight, bias, eps, kind)))
        if err > self.tol:
            self.note(f"add_norm ({kind}): rel err {err:.1e} > {self.tol:.0e}; left out")
            return
        rows = [1, 64]
        fused = [self.time(lambda r=r: add_norm(x[:r], d[:r], weight, bias, eps, kind=kind)) for r in rows]
        plain = [self.time(lambda r=r: norm(x[:r] + d[:r])) for r in rows]
        self.plan.fused_norm = all(f < p for f, p in zip(fused, plain, strict=True))
        self.note(f"add_norm ({kind}, rel err {err:.1e}): rows {rows}: fused {fmt_us(fused)} vs torch {fmt_us(plain)} "
                  f"-> {'fused' if self.plan.fused_norm else 'torch'}")

    def pick_act(self) -> None:
        from alise.worker.kernels.triton_fused import act_mul

        runner = self.runner
        activation = FUSED_ACTIVATIONS.get(runner.spec.activation)
        dense = next((w for w in runner._weights if w.gate_up is not None), None)
        if activation is None or dense is None:
            return
        width = dense.gate_up[0].shape[0]
        x = self.randn(64, width)
        gate, up = x.float().chunk(2, dim=-1)
        torch_act = F.silu if activation == "silu" else lambda g: F.gelu(g, approximate="tanh")
        expect = torch_act(gate).to(self.dtype).float() * up
        err = rel_error(act_mul(x, activation), expect)
        if err > self.tol:
            self.note(f"act_mul ({activation}): rel err {err:.1e} > {self.tol:.0e}; left out")
            return
        rows = [1, 64]
        fused = [self.time(lambda r=r: act_mul(x[:r], activation)) for r in rows]
        plain = [self.time(lambda r=r: dense.act(x[:r, :width // 2]) * x[:r, width // 2:]) for r in rows]
        self.plan.fused_act = all(f < p for f, p in zip(fused, plain, strict=True))
        self.note(f"act_mul ({activation}, rel err {err:.1e}): rows {rows}: fused {fmt_us(fused)} vs torch "
                  f"{fmt_us(plain)} -> {'fused' if self.plan.fused_act else 'torch'}")

    def pick_rope(self) -> None:
        from alise.worker.kernels.triton_fused import rope_write_kv

        tables = list(self.runner._rope.values())
        if not tables:
            return
        t, h, kvh, dim = 64, self.num_heads, self.num_kv_heads, self.head_dim
        if tables[0][0].shape[-1] != dim:
            self.note(f"rope_write_kv: partial rotary ({tables[0][0].shape[-1]} of {dim} dims); torch")
            return
        qkv = self.randn(t, h + 2 * kvh, dim)
        q, k, v = qkv.split([h, kvh, kvh], dim=1)
        cos, sin = tables[0][0][:t], tables[0][1][:t]
        caches = [torch.zeros(-(-t // 16), 16, kvh, dim, device=self.device, dtype=self.runner.kv_cache.dtype)
                  for _ in range(4)]
        slots = torch.randperm(caches[0].shape[0] * 16, device=self.device)[:t]
        q_out = rope_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
        c, s = cos[:, None, :], sin[:, None, :]
        q_ref, k_ref = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        ref.write_kv(caches[2], caches[3], k_ref, v, slots)
        err = max(rel_error(q_out, q_ref), rel_error(caches[0], caches[2]), rel_error(caches[1], caches[3]))
        if err > self.tol:
            self.note(f"rope_write_kv: rel err {err:.1e} > {self.tol:.0e}; left out")
            return
        write = self.runner.attention_backend.write_kv

        def plain(r: int) -> torch.Tensor:
            cc, ss = cos[:r, None, :], sin[:r, None, :]
            write(caches[2], caches[3], k[:r] * cc + rotate_half(k[:r]) * ss, v[:r], slots[:r])
            return q[:r] * cc + rotate_half(q[:r]) * ss

        rows = [1, 64]
        fused = [self.time(lambda r=r: rope_write_kv(q[:r], k[:r], v[:r], cos[:r], sin[:r], caches[0],
                                                        caches[1], slots[:r])) for r in rows]
        torch_t = [self.time(lambda r=r: plain(r)) for r in rows]
        self.plan.fused_rope = all(f < p for f, p in zip(fused, torch_t, strict=True))
        self.note(f"rope_write_kv (rel err {err:.1e}): rows {rows}: fused {fmt_us(fused)} vs torch {fmt_us(torch_t)} "
                  f"-> {'fused' if self.plan.fused_rope else 'torch'}")

    # ------------------------------------------------------------------ attention

    def step_shape(self, num_tokens: int) -> list[tuple[int, int]]:
        """(start_pos, rows) per sequence of a representative mixed step of ``num_tokens`` rows:
        decode rows at the planning context beside one chunk that starts mid-sequence."""
        runner = self.runner
        decodes = max(0, min(runner.max_num_seqs - 1, num_tokens // 2))
        chunk = num_tokens - decodes
        start = max(0, min(256, runner.max_model_len - chunk))
        return [(self.context, 1)] * decodes + [(start, chunk)]

    def step_tensors(self, shape: list[tuple[int, int]], *, own_pages: bool = False) -> dict:
        """Unified-kernel arguments of ``shape`` over layer 0 of the runner's (random) cache, or
        over fresh random pages of just the blocks needed (``own_pages``: checks, whose float32
        reference must not copy a whole cache layer)."""
        runner = self.runner
        bs = runner.block_size
        width = max(-(-(s + n) // bs) for s, n in shape)
        if own_pages:
            num_blocks = len(shape) * width
            pages = runner.kv_cache.dtype
            key_cache = to_pages(self.randn(num_blocks, bs, self.num_kv_heads, self.head_dim), pages)
            value_cache = to_pages(self.randn(num_blocks, bs, self.num_kv_heads, self.head_dim), pages)
        else:
            num_blocks = runner.num_blocks
            key_cache, value_cache = runner.kv_cache.layer(0)
        ids = torch.randperm(len(shape) * width, device=self.device).view(len(shape), width) % num_blocks
        # Padded to the graphs' table width: the kernels compile (and run) as they will in a step.
        ids = F.pad(ids, (0, max(0, runner._table_width - width)))
        starts = torch.tensor([0] + [n for _, n in shape], device=self.device).cumsum(0)
        return dict(query=self.randn(int(starts[-1]), self.num_heads, self.head_dim), key_cache=key_cache,
                    value_cache=value_cache, block_tables=ids,
                    seq_lens=torch.tensor([s + n for s, n in shape], device=self.device), query_start=starts,
                    scale=self.head_dim ** -0.5)

    def pick_unified(self) -> None:
        from alise.worker.kernels import triton_unified

        group = self.num_heads // self.num_kv_heads
        check = self.step_tensors([(37, 1), (0, 70), (max(0, self.context - 40), 40), (3, 1)], own_pages=True)
        # The model's own attention variants: plain, and windowed where a layer has a window.
        spec = self.runner.spec
        windows = sorted({w for w in spec.windows if w is not None})
        variants = [dict(window=w, softcap=spec.attn_softcap) for w in [None] + windows[:1]]
        expects = [ref.unified_attention(check["query"].float(), check["key_cache"].float(),
                                         check["value_cache"].float(), check["block_tables"], check["seq_lens"],
                                         check["query_start"], check["scale"], **v) for v in variants]
        passing = []
        for config in triton_unified.CANDIDATES:
            if config.block_m < group:
                continue
            err = 0.0
            for variant, expect in zip(variants, expects, strict=True):
                out = torch.full_like(check["query"], float("nan"))
                done = self.attempt(f"unified {config}", lambda c=config, v=variant, o=out:
                                    triton_unified.unified_attention(**check, config=c, out=o, **v))
                err = max(err, rel_error(out, expect) if done is not None else float("inf"))
            if err <= self.tol:
                passing.append(config)
            elif err < float("inf"):
                self.note(f"unified {config}: rel err {err:.1e} > {self.tol:.0e}; left out")
        if not passing:
            self.note("unified kernel: no configuration passed its check; prefill attention stays per chunk")
            return
        for tokens in token_buckets(max(2, self.runner.max_num_tokens or 512)):
            case = self.step_tensors(self.step_shape(tokens))
            times = {c: self.time(lambda c=c, case=case: triton_unified.unified_attention(**case, config=c))
                     for c in passing}
            best = min(times, key=times.get)
            self.plan.unified[tokens] = best
            self.note(f"unified, {tokens} rows: best block_m={best.block_m} block_n={best.block_n} "
                      f"warps={best.num_warps} stages={best.num_stages} {times[best] * 1e6:.1f} us (worst "
                      f"{max(times.values()) * 1e6:.1f})")
        self.pick_long_prompts()

    def pick_long_prompts(self) -> None:
        """Fresh prompts longer than the largest bucket: the unified kernel, flash SDPA, or cuDNN SDPA
        padded to a few lengths (:func:`alise.worker.model.attention.padded_lengths`), each timed on
        a prompt of the planning length and on one just past a padding length (the most padding)."""
        from alise.worker.kernels import triton_unified

        top = min(2048, self.runner.max_model_len)
        lengths = ref.padded_lengths(self.runner.max_model_len)
        cases = [(self.step_tensors([(0, n)]), *(self.randn(n, self.num_kv_heads, self.head_dim) for _ in "kv"))
                 for n in (top, top // 2 + 1)]
        times = {"unified": sum(self.time(lambda c=c: triton_unified.unified_attention(
                     **c, config=self.plan.unified_config(c["query"].shape[0]))) for c, _, _ in cases),
                 "flash": sum(self.time(lambda c=c, k=k, v=v: ref.fresh_prefill_attention(c["query"], k, v, c["scale"]))
                              for c, k, v in cases)}
        err = self.check_cudnn(cases, lengths)
        if err is not None:
            timed = [self.attempt("cuDNN SDPA timing", lambda c=c, k=k, v=v: self.time(lambda: padded_cudnn(
                c["query"], k, v, c["scale"], lengths))) for c, k, v in cases]
            if None not in timed:
                times["cudnn"] = sum(timed)
        choice = choose_fresh_path(times, err, self.tol)
        if choice == "cudnn":
            self.plan.cudnn_fresh_lengths = lengths
            warm_cudnn_fresh(self.runner, self.plan)
            if not self.plan.cudnn_fresh_lengths:  # a length's plan failed to build: the next fastest
                choice = choose_fresh_path(times, None, self.tol)
        if choice != "unified":
            self.plan.unified_max_tokens = max(self.plan.unified)
        path = "per chunk, " + ("cuDNN SDPA" if self.plan.cudnn_fresh_lengths else "flash SDPA")
        self.note(f"fresh prompts of {[c['query'].shape[0] for c, _, _ in cases]}: "
                  + " vs ".join(f"{k} {t * 1e6:.0f} us" for k, t in times.items())
                  + (f" (cuDNN rel err {err:.1e})" if err is not None else "")
                  + f" -> steps above {self.plan.unified_max_tokens or 'no limit'} rows "
                  + (path if self.plan.unified_max_tokens else "unified too"))

    def check_cudnn(self, cases: list, lengths: tuple[int, ...]) -> float | None:
        """Largest ``||out - ref||/||ref||`` of the padded cuDNN call against the float32 reference
        over ``cases``; None where cuDNN SDPA is no candidate here or raised (the report says why)."""
        softcap = self.runner.spec.attn_softcap
        if self.device.type != "cuda" or self.dtype not in ref.PADDED_DTYPES or softcap is not None:
            self.note(f"cuDNN SDPA: no candidate ({self.device.type}, {self.dtype}, soft-cap {softcap}); "
                      f"fresh prompts stay on flash SDPA")
            return None
        errs = []
        for case, k, v in cases:
            q, scale = case["query"], case["scale"]
            out = self.attempt("cuDNN SDPA", lambda q=q, k=k, v=v, scale=scale: padded_cudnn(q, k, v, scale, lengths))
            if out is None:
                return None
            errs.append(rel_error(out, ref.fresh_prefill_attention(q.float(), k.float(), v.float(), scale)))
        return max(errs)

    def pick_decode_splits(self) -> None:
        from alise.worker.kernels import triton_attention

        runner = self.runner
        contexts = sorted({self.context, min(2048, runner.max_model_len - 1)})
        for batch in decode_buckets(runner.max_num_seqs):
            cases = []
            for ctx in contexts:
                case = self.step_tensors([(ctx - 1, 1)] * batch)
                cases.append((case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                              case["seq_lens"], case["scale"]))
            default = triton_attention.choose_num_splits(batch, self.num_kv_heads,
                                                         triton_attention._num_sms(self.device))
            options = sorted({1, 2, 4, 8, 16, 32, default} if batch <= 8 else {1, 2, default})
            times = {k: [self.time(lambda a=a, k=k: triton_attention.decode_attention(*a, num_splits=k))
                         for a in cases] for k in options}
            best_each = [min(t[i] for t in times.values()) for i in range(len(contexts))]
            best = min(options, key=lambda k: sum(t / b for t, b in zip(times[k], best_each, strict=True)))
            self.plan.decode_splits[batch] = best
            self.note(f"decode splits, batch {batch} at contexts {contexts}: {best} ({fmt_us(times[best])}; "
                      f"heuristic {default}: {fmt_us(times[default])})")

    def pick_fused_merge(self) -> None:
        """The merge inside the decode launch, where the chosen splits exceed one: checked on fresh
        data several times (a missing ordering shows as an intermittent error), then timed."""
        from alise.worker.kernels import triton_attention

        batches = [b for b, k in self.plan.decode_splits.items() if k > 1]
        if not batches:
            self.note("fused merge: no decode bucket splits; nothing to merge")
            return
        errs, fused_t, plain_t = [], [], []
        for batch in batches:
            case = self.step_tensors([(self.context - 1, 1)] * batch)
            args = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"], case["seq_lens"],
                    case["scale"])
            k = self.plan.decode_splits[batch]
            for _ in range(3):
                args[0].normal_()
                expect = triton_attention.decode_attention(*args, num_splits=k)
                out = torch.full_like(expect, float("nan"))
                triton_attention.decode_attention(*args, num_splits=k, out=out, fused_merge=True)
                errs.append(rel_error(out, expect))
            fused_t.append(self.time(lambda a=args, k=k: triton_attention.decode_attention(*a, num_splits=k,
                                                                                          fused_merge=True)))
            plain_t.append(self.time(lambda a=args, k=k: triton_attention.decode_attention(*a, num_splits=k)))
        if max(errs) > self.tol:
            self.note(f"fused merge: rel err {max(errs):.1e} against the merge kernel; left out")
            return
        self.plan.fused_merge = sum(fused_t) < sum(plain_t)
        self.note(f"fused merge (batches {batches}, rel err {max(errs):.1e}): fused {fmt_us(fused_t)} vs merge kernel "
                  f"{fmt_us(plain_t)} -> {'fused' if self.plan.fused_merge else 'merge kernel'}")

    # ------------------------------------------------------------------ matmuls

    def pick_linears(self) -> None:
        from alise.worker.kernels import triton_fused

        runner = self.runner
        weights = runner._matmuls(0)
        rows_all = sorted(set(decode_buckets(runner.max_num_seqs))
                          | set(token_buckets(runner.max_num_tokens) if runner.max_num_tokens else ()))
        skinny_ok = self.check_skinny(weights[0])
        for name, weight, bias, relu in weights:
            x = self.randn(max(rows_all), weight.shape[1])
            for rows in rows_all:
                key = (weight.shape[0], weight.shape[1], rows)
                a = x[:rows]
                times = {"cublas": self.time(partial(torch_linear, a, weight, bias, relu))}
                if self.device.type == "cuda":
                    with blas_library("cublaslt"):
                        times["cublaslt"] = self.time(partial(torch_linear, a, weight, bias, relu))
                if rows <= triton_fused.MAX_SKINNY_ROWS:
                    for config in (c for c in skinny_ok if rows == 1 or not c.vector):
                        times[config] = self.time(partial(triton_fused.skinny_linear, a, weight, bias,
                                                          relu=relu, config=config))
                best = min(times, key=times.get)
                if best != "cublas":
                    self.plan.linear[key] = best
                gbps = weight.numel() * weight.element_size() / times[best] / 1e9
                self.note(f"matmul {name} {tuple(weight.shape)} x {rows} rows: {_label(best)} "
                          f"{times[best] * 1e6:.1f} us ({gbps:.0f} GB/s of weights); "
                          f"cuBLAS {times['cublas'] * 1e6:.1f}")

    def check_skinny(self, entry) -> list:
        from alise.worker.kernels import triton_fused

        name, weight, bias, relu = entry
        ok = []
        for config in triton_fused.SKINNY_CANDIDATES:
            errs = []
            for rows in (1,) if config.vector else (1, 16):
                x = self.randn(rows, weight.shape[1])
                out = self.attempt(f"skinny {config}", partial(triton_fused.skinny_linear, x, weight, bias,
                                                               relu=relu, config=config))
                expect = torch_linear(x.float(), weight.float(), None if bias is None else bias.float(), relu)
                errs.append(float("inf") if out is None else rel_error(out, expect))
            if max(errs) <= self.tol:
                ok.append(config)
            else:
                self.note(f"skinny {config} on {name}: rel err {max(errs):.1e}; left out")
        return ok


def padded_cudnn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                 lengths: tuple[int, ...]) -> torch.Tensor:
    """The served cuDNN call of a fresh chunk, padded to its length in ``lengths``."""
    length = ref.padded_length(query.shape[0], lengths)
    assert length is not None, f"{query.shape[0]} rows exceed the padded lengths {lengths}"
    return ref.padded_causal_attention(query, key, value, scale, length, SDPBackend.CUDNN_ATTENTION)


def choose_fresh_path(times: dict[str, float], cudnn_err: float | None, tol: float) -> str:
    """The fastest of the timed paths of a long fresh prompt ("unified", "flash", "cudnn"); "cudnn"
    competes only where its error against the reference is within ``tol`` (None or NaN never is)."""
    ok = {k: t for k, t in times.items() if k != "cudnn" or (cudnn_err is not None and cudnn_err <= tol)}
    return min(ok, key=ok.__getitem__)


#: Per thread: the (shape, lengths) whose cuDNN plans this thread has built (warm_cudnn_fresh).
_warmed = threading.local()


def warm_cudnn_fresh(runner, plan: KernelPlan) -> None:
    """Builds cuDNN's plan for every length ``plan`` pads fresh chunks to (one call each, at the
    runner's heads, dtype and scale), so that no step builds one mid-prompt. A length that fails
    turns the choice off (fresh chunks on flash SDPA); the report and the log say why.

    NOTE: torch keeps cuDNN's SDPA plans per thread (a thread_local cache in ATen's cudnn/MHA.cpp),
    and the worker loads the model in one thread and steps it in another (a new one per session).
    So this runs at start-up and again at the first step with a fresh chunk longer than
    ``attention.CUDNN_MIN_ROWS`` in every thread that steps the runner; after that, in that
    thread, it returns at once."""
    key = (runner.spec.num_heads, runner.kv_cache.shape, runner.loaded.dtype, runner.spec.scale,
           plan.cudnn_fresh_lengths)
    done = _warmed.__dict__.setdefault("keys", set())
    if not plan.cudnn_fresh_lengths or key in done:
        return
    shape, start = runner.kv_cache.shape, time.perf_counter()
    try:
        with torch.inference_mode():
            for n in plan.cudnn_fresh_lengths:
                if n <= ref.CUDNN_MIN_ROWS:  # no chunk pads to it (attention.CUDNN_MIN_ROWS)
                    continue
                query = torch.randn(n, runner.spec.num_heads, shape.head_dim, device=runner.device,
                                    dtype=runner.loaded.dtype)
                kv = torch.randn(n, shape.num_kv_heads, shape.head_dim, device=runner.device, dtype=query.dtype)
                padded_cudnn(query, kv, kv.neg(), runner.spec.scale, plan.cudnn_fresh_lengths)
        torch.cuda.synchronize(runner.device)
        done.add(key)
        line = (f"cuDNN SDPA plans for {list(plan.cudnn_fresh_lengths)} rows built in "
                f"{time.perf_counter() - start:.1f} s (thread {threading.current_thread().name})")
    except Exception as exc:  # never a reason not to serve: flash SDPA computes the same
        line = f"cuDNN SDPA plans: failed ({type(exc).__name__}: {str(exc)[:160]}); fresh prompts on flash SDPA"
        plan.cudnn_fresh_lengths = ()
    plan.report.append(line)
    logger.info("kernel plan: %s", line)


def _label(choice) -> str:
    return choice if isinstance(choice, str) else (f"triton skinny block_n={choice.block_n} block_k={choice.block_k} "
                                                   f"warps={choice.num_warps} stages={choice.num_stages}")


def plan_kernels(runner, timer: Callable[[Callable[[], object]], float] | None = None) -> KernelPlan:
    """The plan for ``runner`` on its device: graph-timed on CUDA; the default torch plan off CUDA
    unless a ``timer`` is given (the interpreter tests)."""
    if timer is None:
        if runner.device.type != "cuda":
            return KernelPlan(report=["no CUDA device: the torch path"])
        timer = graph_time_s
    planner = Planner(runner, timer)
    start = time.perf_counter()
    cache = runner.kv_cache
    torch.manual_seed(0)
    cache.fill_random_(num_layers=1)  # realistic data to time on, never zeros
    try:
        with torch.inference_mode():
            for step in (planner.pick_norm, planner.pick_act, planner.pick_unified, planner.pick_rope,
                         planner.pick_decode_splits, planner.pick_fused_merge, planner.pick_linears):
                planner.attempt(step.__name__, step)
    finally:
        cache.key_cache[0].zero_()  # the cache's invariant: never-written slots hold zeros
        cache.value_cache[0].zero_()
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
    planner.note(f"planned in {time.perf_counter() - start:.1f} s")
    return planner.plan


def keep_faster_mixed_graphs(runner) -> None:
    """Per token bucket, a representative mixed step replayed from its graph against the same step
    eager; buckets whose graph gives other logits (beyond the dtype's rounding) or does not win
    are dropped."""
    planner = Planner(runner)
    graphs = runner.mixed_graphs
    keep = []
    bs = runner.block_size
    runner.kv_cache.fill_random_()  # realistic data to time on, zeroed again below
    for tokens in list(graphs.token_buckets):
        shape = planner.step_shape(tokens)
        width = -(-max(s + n for s, n in shape) // bs)
        chunks = [SeqChunk([(7 * i + j) % runner.vocab_size for j in range(n)], s,
                           [(i * width + k) % runner.num_blocks for k in range(width)])
                  for i, (s, n) in enumerate(shape)]
        graph_logits = runner.execute(chunks)
        graph_s = median_wall_s(lambda chunks=chunks: runner.execute(chunks).argmax(-1).tolist())
        saved, runner.mixed_graphs = runner.mixed_graphs, None
        err = rel_error(graph_logits, runner.execute(chunks))
        eager_s = median_wall_s(lambda chunks=chunks: runner.execute(chunks).argmax(-1).tolist())
        runner.mixed_graphs = saved
        if graph_s < eager_s and err <= planner.tol:
            keep.append(tokens)
        planner.note(f"mixed step of {tokens} rows ({len(shape) - 1} decodes + chunk of {shape[-1][1]}): graph "
                     f"{graph_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms, logits rel err {err:.1e}"
                     + ("" if err <= planner.tol else " (too far: dropped)"))
    graphs.drop_tokens(keep)
    runner.plan.mixed_graph_tokens = tuple(keep)
    runner.kv_cache.key_cache.zero_()
    runner.kv_cache.value_cache.zero_()
    runner.plan.report.extend(planner.plan.report)
    if not keep:
        runner.mixed_graphs = None
