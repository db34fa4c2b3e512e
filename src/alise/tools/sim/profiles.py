"""Latency profiles for the simulator: a roofline estimate, and a measurement on this CPU.

A roofline profile is arithmetic, not a measurement: a decode step reads the weights once
(``c0``) and every cached token's K/V once (``c_ctx``); its per-sequence compute hides under
those reads at the batch sizes memory allows, so ``c_seq`` is 0; a prefill token costs its
matmul FLOPs (``c_pre``) and attention adds a quadratic term (``c_pre2``). Kernel launch
overheads, sampling and scheduling are not in it, so it is optimistic. Every output that uses
one says "roofline".
"""

from __future__ import annotations

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
