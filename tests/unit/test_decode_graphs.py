"""The CPU-checkable half of the CUDA decode graphs: buckets, static buffers, padding rows.

Capture itself needs CUDA (tests/gpu); here the same padded static-buffer step runs eagerly
through the torch backend, which must give the logits of an ordinary ``execute``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from alise.worker.model.attention import write_kv
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.cuda_graphs import DecodeInputs, decode_buckets, pick_bucket
from alise.worker.model.fused_weights import fuse_linears
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner


def test_buckets_cover_every_batch_size_up_to_the_maximum() -> None:
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(1) == [1]
    assert decode_buckets(200) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192, 200]
    buckets = decode_buckets(64)
    assert [pick_bucket(n, buckets) for n in (1, 3, 8, 9, 33, 64)] == [1, 4, 8, 16, 40, 64]
    assert pick_bucket(65, buckets) is None
    with pytest.raises(ValueError, match="max_batch"):
        decode_buckets(0)


def test_inputs_fill_real_rows_and_pad_the_rest_of_the_bucket() -> None:
    inputs = DecodeInputs(max_batch=8, width=5, block_size=4, device=torch.device("cpu"))
    inputs.host.fill_(99)  # stale values from an earlier, larger step
    chunks = [SeqChunk([7], 0, [3]), SeqChunk([8], 9, [5, 1, 2, 6])]  # position 9: block 2, offset 1
    inputs.fill(chunks, bucket=4)
    ids, positions, slots, lens, tables = inputs.split(inputs.host.numpy(), 4)
    assert ids.tolist() == [7, 8, 0, 0]
    assert positions.tolist() == [0, 9, 0, 0]
    assert slots.tolist() == [3 * 4 + 0, 2 * 4 + 1, -1, -1]
    assert lens.tolist() == [1, 10, 1, 1]
    assert tables[0, 0] == 3 and tables[1, :3].tolist() == [5, 1, 2]
    assert tables[2:, 0].tolist() == [0, 0]
    inputs.upload()
    assert torch.equal(inputs.device_buffer, inputs.host)
    dev_ids, meta = inputs.metadata(4)
    assert dev_ids.tolist() == [7, 8, 0, 0] and meta.is_all_decode
    assert meta.decode_block_tables.shape == (4, 5) and meta.decode_context_lens.tolist() == [1, 10, 1, 1]


def test_write_kv_skips_negative_slots() -> None:
    key_cache = torch.zeros(2, 2, 1, 3)
    value_cache = torch.zeros(2, 2, 1, 3)
    key = torch.arange(1.0, 10.0).view(3, 1, 3)
    write_kv(key_cache, value_cache, key, -key, torch.tensor([2, -1, 0]))
    flat = key_cache.view(4, 3)
    assert torch.equal(flat[2], key[0, 0]) and torch.equal(flat[0], key[2, 0])
    assert not flat[1].any() and not flat[3].any()
    assert torch.equal(value_cache.view(4, 3)[2], -key[0, 0])


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request: pytest.FixtureRequest, tiny_llama_dir, tiny_opt_dir) -> LoadedModel:
    return load_model(str(tiny_llama_dir if request.param == "llama" else tiny_opt_dir))


def test_static_buffer_decode_matches_execute(tiny: LoadedModel) -> None:
    """5 sequences in the 8-bucket (3 padding rows), then 2 in the 2-bucket, against plain steps."""
    block_size, per_seq = 4, 6
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(n)] for n in (3, 9, 4, 13, 1)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    results = []
    for use_static in (False, True):
        runner = ModelRunner(tiny, num_blocks=per_seq * len(prompts), block_size=block_size)
        graphs = runner.make_decode_graphs(8)
        runner.execute([SeqChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
        step = runner.execute if not use_static else graphs.run
        logits = []
        for k in range(3):
            chunks = [SeqChunk([1000 + k + i], len(p) + k, t)
                      for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
            logits.append(step(chunks))
        chunks = [SeqChunk([555], len(prompts[i]) + 3, tables[i]) for i in (1, 3)]
        logits.append(step(chunks))
        results.append(logits)
        assert not runner.kv_cache.key_cache[:, per_seq * len(prompts):].any()
    for eager, static in zip(*results, strict=True):
        assert static.shape == eager.shape
        assert torch.allclose(static, eager, atol=1e-4, rtol=1e-4)


def test_fused_projections_are_views_shared_with_the_hf_modules(tiny: LoadedModel) -> None:
    runner = ModelRunner(tiny, num_blocks=4, block_size=4)
    layers = tiny.model.model.layers if tiny.family == "llama" else tiny.model.model.decoder.layers
    attn = layers[0].self_attn
    weight, bias = runner._qkv[0]
    assert attn.q_proj.weight.data_ptr() == weight.data_ptr()
    assert np.array_equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).numpy(),
                          weight.numpy())
    # A second runner on the same model reuses the fused storage instead of copying it again.
    again, _ = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    assert again.data_ptr() == weight.data_ptr() and again.shape == weight.shape
    assert (bias is None) == (attn.q_proj.bias is None)
