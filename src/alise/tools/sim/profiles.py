"""Latency profiles for the simulator: a roofline estimate, and a measurement on this CPU.

A roofline profile is arithmetic, not a measurement: a decode step reads the weights once
(``c0``) and every cached token's K/V once (``c_ctx``); its per-sequence compute hides under
those reads at the batch sizes memory allows, so ``c_seq`` is 0; a prefill token costs its
matmul FLOPs (``c_pre``) and attention adds a quadratic term (``c_pre2``). Kernel launch
overheads, sampling and scheduling are not in it, so it is optimistic. Every output that uses
one says "roofline".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

from alise.core.latency_model import LatencyModel


def roofline_profile(*, name: str, num_params: float, weight_bytes: float,
                     kv_bytes_per_token: float, hidden_size: int, num_layers: int,
                     hbm_bytes_per_s: float, flops_per_s: float) -> LatencyModel:
    c0 = weight_bytes / hbm_bytes_per_s
    c_ctx = kv_bytes_per_token / hbm_bytes_per_s
    c_pre = 2.0 * num_params / flops_per_s
    # Causal attention: QK^T and PV, 2 FLOPs per multiply-add, half the square.
    c_pre2 = 2.0 * hidden_size * num_layers / flops_per_s
    meta = dict(
        kind="roofline", device="NVIDIA H100 (assumed figures, not measured)",
        date=date.today().isoformat(),
        assumptions=dict(num_params=num_params, weight_bytes=weight_bytes,
                         kv_bytes_per_token=kv_bytes_per_token, hidden_size=hidden_size,
                         num_layers=num_layers, hbm_bytes_per_s=hbm_bytes_per_s,
                         flops_per_s=flops_per_s),
        formula="step = c0 + c_ctx*context_tokens + c_pre*prefill_tokens + c_pre2*sum(prefill^2); "
                "c0 = weights/HBM, c_ctx = KV bytes per token/HBM, c_pre = 2*params/FLOPs",
        command="python bench/roofline_profile.py")
    return LatencyModel(c0_s=c0, c_seq_s=0.0, c_ctx_s=c_ctx, c_pre_s=c_pre, c_pre2_s=c_pre2,
                        name=name, meta=meta)


def opt13b_h100_roofline() -> LatencyModel:
    """OPT-13B, fp16, on one H100 SXM: 25.7 GB of weights, ~3 TB/s, ~800 TFLOP/s dense."""
    return roofline_profile(
        name="opt-13b-h100-roofline", num_params=12.85e9, weight_bytes=25.7e9,
        kv_bytes_per_token=0.8e6, hidden_size=5120, num_layers=40,
        hbm_bytes_per_s=3.0e12, flops_per_s=800e12)


@dataclass(frozen=True)
class AllReduceCost:
    """One all-reduce of ``n`` bytes across the ranks: ``latency_s + n / bytes_per_s`` (measured:
    bench/gpu/tp_decode.py prints it per decode batch; a fit over two sizes gives both terms)."""

    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if self.latency_s < 0 or not self.bytes_per_s > 0:
            raise ValueError(f"all-reduce cost needs latency_s >= 0 and bytes_per_s > 0, got {self}")


def tensor_parallel_profile(model: LatencyModel, *, tensor_parallel_size: int, num_layers: int, hidden_size: int,
                            num_kv_heads: int, activation_bytes: int, allreduce: AllReduceCost) -> LatencyModel:
    """A one-device profile as a worker over ``tensor_parallel_size`` ranks would pay it: an
    estimate, labelled as one.

    Each rank reads a 1/N share of the weights (``c0``) and of the prefill FLOPs (``c_pre``,
    ``c_pre2``) and its KV heads' share of each cached token (``c_ctx``: ``max(1, K/N)`` of ``K``
    heads, fewer KV heads than ranks being replicated); the per-sequence and per-launch terms
    stay (a rank launches as many kernels). Every step then waits for ``2 * num_layers + 1``
    all-reduces (after each attention and MLP block, and the vocabulary-parallel embedding)
    of ``hidden_size`` activations per token fed: their latencies join ``c0``, their bytes the
    per-token terms (``c_seq`` for a decode's token, ``c_pre`` for a prefill's)."""
    n = tensor_parallel_size
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if n == 1:
        return model
    num_reduces = 2 * num_layers + 1
    per_token_s = num_reduces * hidden_size * activation_bytes / allreduce.bytes_per_s
    kv_share = max(1, num_kv_heads // n) / num_kv_heads
    meta = dict(model.meta, kind=f"{model.meta.get('kind', 'measured')}, tensor-parallel estimate",
                tensor_parallel=dict(size=n, num_layers=num_layers, hidden_size=hidden_size,
                                     num_kv_heads=num_kv_heads, activation_bytes=activation_bytes,
                                     allreduce_latency_s=allreduce.latency_s,
                                     allreduce_bytes_per_s=allreduce.bytes_per_s))
    return replace(model, name=f"{model.name}-tp{n}", c0_s=model.c0_s / n + num_reduces * allreduce.latency_s,
                   c_seq_s=model.c_seq_s + per_token_s, c_ctx_s=model.c_ctx_s * kv_share,
                   c_pre_s=model.c_pre_s / n + per_token_s, c_pre2_s=model.c_pre2_s / n, meta=meta)


def tensor_parallel_from_args(model: LatencyModel, args) -> LatencyModel:
    """``model`` for the sim's ``--tensor-parallel-size`` workers (unchanged at 1): the shape from
    ``--tp-model`` (default: the model the profile was measured on), 16-bit activations."""
    n = getattr(args, "tensor_parallel_size", None) or 1
    if n == 1 or model.meta.get("tensor_parallel_size", 1) > 1:
        return model  # a profile measured over its ranks (alise worker --profile-latency) has the all-reduces
    from alise.modelinfo.source import resolve_model

    name = args.tp_model or model.meta.get("model")
    if not name:
        raise ValueError("--tensor-parallel-size needs --tp-model: the profile does not name its model")
    source = resolve_model(name)
    heads = source.count("num_attention_heads")
    return tensor_parallel_profile(
        model, tensor_parallel_size=n, num_layers=source.count("num_hidden_layers"),
        hidden_size=source.count("hidden_size"), num_kv_heads=source.fields.get("num_key_value_heads") or heads,
        activation_bytes=2, allreduce=AllReduceCost(args.allreduce_us * 1e-6, args.allreduce_gb_s * 1e9))


def profile_label(model: LatencyModel) -> str:
    kind = model.meta.get("kind", "measured" if model.meta.get("device") else "unlabelled")
    return f"{model.name} ({kind})"


def measure_cpu_profile(model: str = "tiny-llama", *, batches=(1, 2, 4, 8, 16),
                        contexts=(16, 64, 128, 256, 512), num_decode_steps: int = 4,
                        block_size: int = 16, seed: int = 0) -> LatencyModel:
    """Measures step times of ``model`` on this CPU with the real worker engine, then fits them.

    For each batch size and context: one prefill step of ``batch`` prompts of ``context``
    tokens, then ``num_decode_steps`` decode steps, timed as the worker times them
    (``StepReport.step_duration_s``: forward pass plus sampling). Imports torch: call it from a
    script, never from the core.
    """
    import torch

    from alise.core.commands import Admit
    from alise.core.sampling import SamplingParams
    from alise.worker.engine import WorkerEngine
    from alise.worker.model.loader import load_model
    from alise.worker.model.runner import ModelRunner

    loaded = load_model(model, seed=seed)
    max_ctx = max(c for c in contexts if c + num_decode_steps + 1 < loaded.max_model_len)
    num_blocks = max(batches) * (-(-(max_ctx + num_decode_steps + 1) // block_size))
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=block_size)
    engine = WorkerEngine(runner, eos_token_id=None, max_model_len=loaded.max_model_len)
    sampling = SamplingParams(max_tokens=10_000, ignore_eos=True)
    samples = []
    step_id = 0
    job_num = 0
    for _ in range(2):  # warm-up: allocator paths, kernels
        engine.apply([Admit("warm", [5] * 32, sampling)])
        engine.step(0)
        engine.abort(["warm"])
    for batch in batches:
        for context in contexts:
            if context > max_ctx:
                continue
            ids = [f"p{job_num + i}" for i in range(batch)]
            job_num += batch
            engine.apply([Admit(j, [5 + (k % 50) for k in range(context)], sampling) for j in ids])
            step_id += 1
            report = engine.step(step_id)
            samples.append((batch, batch * context, [context] * batch, report.step_duration_s))
            for k in range(num_decode_steps):
                step_id += 1
                report = engine.step(step_id)
                samples.append((batch, batch * (context + k + 1), [], report.step_duration_s))
            engine.abort(ids)
    return LatencyModel.fit(samples, name=f"{model}-cpu", meta=dict(
        kind="measured", device=f"CPU, {torch.get_num_threads()} torch threads",
        model=model, date=date.today().isoformat(), num_samples=len(samples),
        command="python bench/cpu_profile.py"))
