"""A fresh chunk padded at its end to a fixed length attends exactly as the chunk alone.

cuDNN's SDPA builds an execution plan per (query, key) shape, so the kernel plan may run fresh
chunks padded to a few lengths (alise.worker.model.attention.padded_causal_attention). A causal
query at position i sees keys <= i only, so zero rows appended after the chunk change none of its
rows. On the CPU the same padded call runs on torch's math backend; which layers take the padded
cuDNN call is checked by its refusal here (the CPU has no cuDNN, so taking it raises).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from alise.worker.model import attention

LENGTHS = attention.padded_lengths(600)


def qkv(n: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n)
    return (torch.randn(n, heads, dim, generator=gen).to(dtype), torch.randn(n, kv_heads, dim, generator=gen).to(dtype),
            torch.randn(n, kv_heads, dim, generator=gen).to(dtype))


def test_padded_lengths_cover_every_length_with_little_padding() -> None:
    assert LENGTHS == (256, 512, 600)
    assert attention.padded_lengths(2048) == tuple(range(256, 2049, 256))
    long = attention.padded_lengths(32768)
    assert len(long) == 40 and long[-1] == 32768
    for n in (1, 255, 256, 257, 2048, 2049, 5000, 32768):
        padded = attention.padded_length(n, long)
        assert padded is not None and 0 <= padded - n < max(256, padded // 8), n  # under 256 rows, or an eighth
    assert attention.padded_length(601, LENGTHS) is None


@pytest.mark.parametrize("n", [1, 2, 100, 256, 257, 512, 600])
def test_the_first_rows_of_the_padded_call_are_the_unpadded_result(n: int) -> None:
    query, key, value = qkv(n)
    length = attention.padded_length(n, LENGTHS)
    out = attention.padded_causal_attention(query, key, value, 0.25, length, SDPBackend.MATH)
    expect = attention.fresh_prefill_attention(query, key, value, 0.25)
    assert out.shape == expect.shape == (n, 4, 16)
    assert (out - expect).abs().max().item() <= 1e-5


def test_padding_rows_are_needed_for_the_check_to_mean_something() -> None:
    """Negative control: the same padding without the causal mask changes the real rows."""
    query, key, value = qkv(100)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 156)).transpose(0, 1)  # noqa: E731
    full = attention.attend(pad(query), pad(key), pad(value), 0.25).transpose(0, 1)[:100]
    assert (full - attention.fresh_prefill_attention(query, key, value, 0.25)).abs().max().item() > 1e-2


@pytest.mark.parametrize(("window", "softcap", "dtype"), [(50, None, torch.float16), (None, 30.0, torch.float16),
                                                          (None, None, torch.float32), (500, None, torch.float16)],
                         ids=["window-cuts", "softcap", "fp32", "window-cuts-nothing"])
def test_only_plain_causal_fp16_bf16_layers_take_the_padded_cudnn_call(window, softcap, dtype) -> None:
    query, key, value = qkv(100, dtype=dtype)
    if window == 500:  # a window wider than the chunk is plain causal: it takes the cuDNN call
        with pytest.raises(RuntimeError):
            attention.fresh_prefill_attention(query, key, value, 0.25, window, softcap, padded_len=256)
        return
    out = attention.fresh_prefill_attention(query, key, value, 0.25, window, softcap, padded_len=256)
    expect = attention.fresh_prefill_attention(query, key, value, 0.25, window, softcap)
    assert torch.equal(out, expect)


def test_fresh_spans_carry_their_padded_length_and_others_none() -> None:
    meta = attention.build_attention_metadata([0, 10, 0, 0], [300, 20, 1, 40], [[0] * 40, [1] * 40, [2], [3] * 3],
                                              block_size=16, device=torch.device("cpu"),
                                              cudnn_fresh_lengths=LENGTHS)
    # A fresh chunk of 40 rows stays on flash SDPA: only chunks above CUDNN_MIN_ROWS are padded.
    assert [(s.num_tokens, s.padded_len) for s in meta.prefills] == [(300, 512), (20, None), (40, None)]
    at_the_bound = attention.build_attention_metadata([0, 0], [attention.CUDNN_MIN_ROWS, attention.CUDNN_MIN_ROWS + 1],
                                                      [[0] * 16, [1] * 17], block_size=16,
                                                      device=torch.device("cpu"), cudnn_fresh_lengths=LENGTHS)
    assert [s.padded_len for s in at_the_bound.prefills] == [None, 512]
    plain = attention.build_attention_metadata([0], [300], [[0] * 40], block_size=16, device=torch.device("cpu"))
    assert plain.prefills[0].padded_len is None


def test_the_padded_call_leaves_the_process_backend_flags_as_it_found_them() -> None:
    """The runner turns cuDNN SDPA off process-wide; the padded call enables only its backend
    for itself (sdpa_kernel sets the same flags) and restores them, also when it raises."""
    flags = torch.backends.cuda
    before = flags.cudnn_sdp_enabled()
    flags.enable_cudnn_sdp(False)
    try:
        query, key, value = qkv(10, dtype=torch.float16)
        with pytest.raises(RuntimeError):  # no cuDNN on the CPU
            attention.padded_causal_attention(query, key, value, 0.25, 256, SDPBackend.CUDNN_ATTENTION)
        attention.padded_causal_attention(*qkv(10), 0.25, 256, SDPBackend.MATH)
        assert not flags.cudnn_sdp_enabled()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    finally:
        flags.enable_cudnn_sdp(before)
