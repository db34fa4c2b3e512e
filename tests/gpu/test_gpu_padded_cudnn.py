"""Fresh-prompt attention through cuDNN's SDPA on padded lengths against flash SDPA. CUDA only.

At OPT-13B's heads (40 of 128), fp16 and bf16, prompts of 300, 1000 and 2000 tokens: the padded
cuDNN call (alise.worker.model.attention.padded_causal_attention, lengths of padded_lengths(2048))
is within the dtype's rounding of flash SDPA (max abs difference and ``||out - ref|| / ||ref||``),
and both are graph-timed and printed (``pytest -s`` shows them; a benchmark's figures, not asserts).
Also printed: the wall time of the first call at a new padded length (cuDNN builds its plan) and of
a call of another prompt length padded to the same length (the plan reused). And a runner whose
plan chose cuDNN, stepped from a thread of its own (cuDNN keeps its plans per thread), builds them
there at its first step and computes the flash plan's logits.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from alise.worker.model import attention  # noqa: E402
from alise.worker.model.chunk import SeqChunk  # noqa: E402
from alise.worker.model.kernel_plan import KernelPlan  # noqa: E402
from alise.worker.model.loader import load_model  # noqa: E402
from alise.worker.model.runner import ModelRunner  # noqa: E402
from alise.worker.model.timing import graph_time_s, rel_error  # noqa: E402
from tinymodels import make_tiny_model_dir  # noqa: E402

HEADS, HEAD_DIM = 40, 128
LENGTHS = attention.padded_lengths(2048)
#: Max abs difference and relative error allowed between two fp16/bf16 attention kernels.
TOLERANCE = {torch.float16: (4e-3, 3e-3), torch.bfloat16: (3e-2, 2e-2)}


def flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return attention.fresh_prefill_attention(query, key, value, HEAD_DIM ** -0.5)


def cudnn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    length = attention.padded_length(query.shape[0], LENGTHS)
    return attention.padded_causal_attention(query, key, value, HEAD_DIM ** -0.5, length,
                                             SDPBackend.CUDNN_ATTENTION)


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@pytest.fixture(autouse=True)
def cudnn_off_outside_the_call():
    """The runner's setting: cuDNN SDPA off process-wide (the padded call enables it for itself)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", [300, 1000, 2000])
def test_padded_cudnn_matches_flash_sdpa(n: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n)
    qkv = torch.randn(n, 3 * HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    query, key, value = qkv.split([HEADS, HEADS, HEADS], dim=1)  # strided views, as the runner's
    expect = flash(query, key, value)
    out = cudnn(query, key, value)
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    max_abs, rel = (out.float() - expect.float()).abs().max().item(), rel_error(out, expect)
    flash_s = graph_time_s(lambda: flash(query, key, value))
    cudnn_s = graph_time_s(lambda: cudnn(query, key, value))
    flops = 4 * n * n / 2 * HEADS * HEAD_DIM
    print(f"\n{n} tokens {dtype} (padded to {attention.padded_length(n, LENGTHS)}): flash SDPA "
          f"{flash_s * 1e6:.0f} us ({flops / flash_s / 1e12:.0f} TFLOP/s), padded cuDNN {cudnn_s * 1e6:.0f} us "
          f"({flops / cudnn_s / 1e12:.0f} TFLOP/s); max abs diff {max_abs:.1e}, rel err {rel:.1e}")
    abs_tol, rel_tol = TOLERANCE[dtype]
    assert max_abs <= abs_tol and rel <= rel_tol


def test_one_plan_per_padded_length() -> None:
    """Prints the first call at a padded length (plan built) against a call of another prompt
    length padded to the same length; both outputs match flash SDPA."""
    lengths = []
    for n in (1500, 1400, 1300):  # all padded to 1536
        query, key, value = torch.randn(3, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16).unbind(0)
        outs: list[torch.Tensor] = []
        lengths.append(wall_ms(lambda q=query, k=key, v=value, o=outs: o.append(cudnn(q, k, v))))
        assert rel_error(outs[0], flash(query, key, value)) <= TOLERANCE[torch.float16][1]
    print(f"\npadded to 1536: first call (1500 tokens) {lengths[0]:.1f} ms, then 1400 tokens {lengths[1]:.1f} ms, "
          f"1300 tokens {lengths[2]:.1f} ms")


def test_a_runner_on_the_cudnn_plan_builds_its_plans_per_thread_and_computes_the_same(tmp_path) -> None:
    model = make_tiny_model_dir(tmp_path, "opt", dtype=torch.float16, hidden_size=256, ffn_dim=512,
                                num_attention_heads=2, word_embed_proj_dim=256, max_position_embeddings=1024)
    runner = ModelRunner(load_model(str(model), device="cuda", dtype="float16"), num_blocks=64, block_size=16,
                         fast_kernels=False, use_cuda_graphs=False)
    chunk = SeqChunk(torch.randint(0, runner.vocab_size, (700,)).tolist(), 0, list(range(44)))
    expect = runner.execute([chunk], all_logits=True)[0]
    runner.ops.plan = KernelPlan(cudnn_fresh_lengths=attention.padded_lengths(runner.max_model_len))
    got: list[torch.Tensor] = []

    def step() -> None:
        flags = torch.backends.cuda
        # Every SDPA backend off: the step succeeds only through the padded call, which turns
        # cuDNN on for itself.
        flags.enable_flash_sdp(False), flags.enable_mem_efficient_sdp(False), flags.enable_math_sdp(False)
        try:
            got.append(runner.execute([chunk], all_logits=True)[0])
        finally:
            flags.enable_flash_sdp(True), flags.enable_mem_efficient_sdp(True), flags.enable_math_sdp(True)

    thread = threading.Thread(target=step, name="steps-on-cudnn")
    thread.start()
    thread.join()
    assert got, "the step raised (see the thread's traceback above)"
    assert runner.plan.cudnn_fresh_lengths, runner.plan.report  # not turned off by a failed build
    assert "(thread steps-on-cudnn)" in runner.plan.report[-1], runner.plan.report
    print(f"\n{runner.plan.report[-1]}; logits rel err against flash {rel_error(got[0], expect):.1e}")
    assert rel_error(got[0], expect) <= 1e-2
