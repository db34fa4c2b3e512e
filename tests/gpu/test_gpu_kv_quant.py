"""The fused Triton KV quantizer against the torch codec, byte for byte. CUDA only.

The kernels read pages in place through shuffled block tables; the torch reference gathers them
first. Quantized streams (codes, fp16 scales and zeros) must be identical bytes; dequantized
values may differ by one rounding step of the cache dtype (the compiler may fuse the multiply-add).
Then the KV manager over ``TorchKvMover`` end to end: a job quantized and resumed on the fused path holds the same KV as
the same job on the torch path.
"""

from __future__ import annotations

import random

import pytest
import torch

# Before any kernel module is imported: on a machine without CUDA the interpreter tests of
# tests/unit import them (compiled for the interpreter) in this same process.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from alise.core.blocks import quantized_blocks
from alise.core.commands import KvAction
from alise.core.job import KvPlace
from alise.worker.kernels import triton_kvquant
from alise.worker.kv_manager import KvManager, KvState
from alise.worker.model.kv_cache import KVCache, KVShape
from alise.worker.model.kv_offload import KvCodec, TorchKvMover, dequantize_groups, quantize_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not triton_kvquant.is_available(
    torch.device("cuda")), reason="needs CUDA and Triton")

GROUP = 32


def one_ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def reference_stream(cache: torch.Tensor, table: list[int], bits: int) -> tuple[torch.Tensor, ...]:
    layers = cache.shape[0]
    groups = cache[:, torch.tensor(table, device=cache.device)].reshape(layers, -1, GROUP)
    codes, scale, zero = quantize_groups(groups, bits)
    stream = torch.cat((codes.reshape(layers, -1), scale.view(torch.uint8), zero.view(torch.uint8)), 1)
    return stream, codes, scale, zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 37, 16, 8, 128), (2, 20, 8, 2, 64), (5, 64, 16, 4, 32)])
def test_kernels_match_the_torch_codec(dtype, bits, shape):
    rng = random.Random(hash((str(dtype), bits, shape)) & 0xFFFF)
    torch.manual_seed(rng.randrange(1 << 30))
    layers, pages, block_size, heads, dim = shape
    cache = (torch.randn(shape, device="cuda") * rng.choice([0.1, 1.0, 30.0])).to(dtype)
    cache[0, 1, 0, 0, :GROUP] = 0.5              # a constant group (scale 0 -> 1)
    cache[-1, 2, -1, -1, -GROUP:] = -60000.0     # values at the fp16 limit
    table = rng.sample(range(pages), rng.randint(1, pages // 2))
    stream, codes, scale, zero = reference_stream(cache, table, bits)
    out = torch.full((layers, stream.shape[1] + 10), 0xAB, dtype=torch.uint8, device="cuda")
    index = torch.tensor(table, dtype=torch.int32, device="cuda")
    triton_kvquant.quantize_pages(cache, index, len(table), GROUP, bits, out)
    assert torch.equal(out[:, :stream.shape[1]], stream)
    assert (out[:, stream.shape[1]:] == 0xAB).all()   # nothing written past the stream

    dest_table = rng.sample(range(pages), len(table))
    dest = torch.full_like(cache, float("nan"))
    triton_kvquant.dequantize_pages(out, torch.tensor(dest_table, device="cuda"), len(table),
                                    GROUP, bits, dest)
    expect = dequantize_groups(codes, scale, zero, bits).reshape(layers, len(table), *shape[2:])
    got = dest[:, torch.tensor(dest_table, device="cuda")].float()
    assert not got.isnan().any()
    assert ((got - expect).abs() <= one_ulp(dtype) * expect.abs() + 1e-30).all()
    others = [p for p in range(pages) if p not in dest_table]
    assert dest[:, torch.tensor(others, device="cuda")].isnan().all()  # other pages untouched
    # The values are the original's, within the format's error.
    original = cache[:, torch.tensor(table, device="cuda")].float()
    rel = ((got - original).norm() / original.norm()).item()
    assert rel < (1e-2 if bits == 8 else 1.2e-1)


def test_negative_control_detects_a_wrong_table():
    cache = torch.randn((2, 8, 16, 4, 64), device="cuda", dtype=torch.float16)
    table = [3, 1, 6]
    stream, *_ = reference_stream(cache, table, 8)
    out = torch.zeros((2, stream.shape[1]), dtype=torch.uint8, device="cuda")
    triton_kvquant.quantize_pages(cache, torch.tensor([3, 1, 5], device="cuda"), 3, GROUP, 8, out)
    assert not torch.equal(out, stream)


@pytest.mark.parametrize("bits", [8, 4])
def test_offload_quantize_and_resume_same_on_both_paths(bits):
    shape = KVShape(num_layers=4, num_kv_heads=4, head_dim=128)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        cache = KVCache(shape, num_blocks=40, block_size=16, dtype=torch.float16, device="cuda")
        cache.key_cache.normal_()
        cache.value_cache.normal_()
        mover = TorchKvMover(cache, num_host_blocks=0)
        assert mover.fused  # CUDA with Triton
        mover.fused = fused
        offload = KvManager(40, 0, 16, mover)
        allocator = offload.allocator
        seq = KvState(block_table=allocator.allocate(9), num_cached=9 * 16 - 5)
        before = torch.stack((cache.key_cache[:, seq.block_table], cache.value_cache[:, seq.block_table]))
        assert offload.pause(seq, KvAction.QUANTIZE_INT8 if bits == 8 else KvAction.QUANTIZE_INT4) is None
        assert seq.place is (KvPlace.DEVICE_INT8 if bits == 8 else KvPlace.DEVICE_INT4)
        assert len(seq.block_table) == quantized_blocks(9, bits)
        free_paused = allocator.num_free
        assert offload.resume(seq) is None
        assert seq.place is KvPlace.DEVICE and len(seq.block_table) == 9
        after = torch.stack((cache.key_cache[:, seq.block_table], cache.value_cache[:, seq.block_table]))
        results.append((free_paused, before.float(), after.float()))
    (free_f, before_f, after_f), (free_t, before_t, after_t) = results
    assert free_f == free_t
    assert torch.equal(before_f, before_t)
    assert ((after_f - after_t).abs() <= one_ulp(torch.float16) * after_t.abs()).all()
    rel = ((after_f - before_f).norm() / before_f.norm()).item()
    assert rel < (1e-2 if bits == 8 else 1.2e-1)


def test_codec_layout_is_what_the_kernels_write():
    cache = KVCache(KVShape(num_layers=1, num_kv_heads=2, head_dim=64), num_blocks=4, block_size=16,
                    dtype=torch.float16, device="cuda")
    codec = KvCodec(cache)
    for bits in (8, 4):
        assert codec.stream_bytes(3, bits) == triton_kvquant.stream_bytes(
            3 * codec.values_per_block // GROUP, GROUP, bits)
