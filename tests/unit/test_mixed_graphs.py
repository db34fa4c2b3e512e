"""The CPU-checkable half of the mixed-step CUDA graphs: buckets, static buffers, padding.

Capture needs CUDA (tests/gpu); here the same padded static-buffer step runs eagerly through the
torch backend (the unified path's reference), and must give the logits of an ordinary
``execute`` for steps that mix decodes, fresh prompts and chunks starting mid-sequence, with
padding rows and padding sequences in the bucket and chunks that want no logits.
"""

from __future__ import annotations

import random

import pytest
import torch

from alise.worker.model.chunk import SeqChunk
from alise.worker.model.cuda_graphs import MixedInputs, mixed_seq_buckets, token_buckets
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner


def test_token_and_sequence_buckets() -> None:
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert token_buckets(40) == [16, 32, 40]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert mixed_seq_buckets(16, 256) == [4, 16]
    assert mixed_seq_buckets(512, 256) == [4, 16, 64, 128, 256]
    assert mixed_seq_buckets(512, 300) == [4, 16, 64, 128, 256, 300]
    assert mixed_seq_buckets(64, 10) == [4, 10]
    with pytest.raises(ValueError, match="max_tokens"):
        token_buckets(1)


def test_inputs_fill_rows_sequences_and_padding() -> None:
    inputs = MixedInputs(max_tokens=16, max_seqs=4, width=3, block_size=4, device=torch.device("cpu"))
    inputs.host.fill_(99)  # stale values from an earlier step
    # A decode at position 5 (block 1 offset 1), a chunk of 3 at position 2, a fresh prompt of 2.
    chunks = [SeqChunk([7], 5, [4, 2]), SeqChunk([8, 9, 10], 2, [6, 1]), SeqChunk([11, 12], 0, [3])]
    wanted = inputs.fill(chunks, 8, 4, [True, False, True])
    ids, positions, slots, logit_rows, seq_lens, query_start, tables = inputs.split(inputs.host.numpy(), 8, 4)
    assert ids.tolist() == [7, 8, 9, 10, 11, 12, 0, 0]
    assert positions.tolist() == [5, 2, 3, 4, 0, 1, 0, 0]
    assert slots.tolist() == [2 * 4 + 1, 6 * 4 + 2, 6 * 4 + 3, 1 * 4 + 0, 3 * 4, 3 * 4 + 1, -1, -1]
    assert query_start.tolist() == [0, 1, 4, 6, 6]  # the padding sequence has no rows
    assert seq_lens.tolist() == [6, 5, 2, 1]
    assert wanted == 2 and logit_rows[:2].tolist() == [0, 5]
    assert tables[0, :2].tolist() == [4, 2] and tables[1, :2].tolist() == [6, 1] and tables[2, 0] == 3
    assert tables[3, 0] == 0


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request: pytest.FixtureRequest, tiny_llama_dir, tiny_opt_dir) -> LoadedModel:
    return load_model(str(tiny_llama_dir if request.param == "llama" else tiny_opt_dir))


def test_static_buffer_mixed_steps_match_execute(tiny: LoadedModel) -> None:
    """Three mixed steps (buckets (32, 4), (16, 4), (32, 4): padding rows and sequences) against
    plain steps."""
    block_size, per_seq = 4, 8
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(n)] for n in (9, 4, 13, 6)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(4)]
    steps = [
        # decodes of 0 and 1 beside a fresh prompt of 2 and the first chunk of 3 (wants no logits)
        lambda: [SeqChunk([501], 9, tables[0]), SeqChunk([502], 4, tables[1]), SeqChunk(prompts[2], 0, tables[2]),
                 SeqChunk(prompts[3][:4], 0, tables[3], needs_logits=False)],
        # a decode beside 3's second chunk at start_pos 4; then 17 tokens of 1 at 5 beside a decode
        lambda: [SeqChunk([503], 10, tables[0]), SeqChunk(prompts[3][4:], 4, tables[3])],
        lambda: [SeqChunk(list(range(600, 617)), 5, tables[1]), SeqChunk([504], 13, tables[2])],
    ]
    results = []
    for use_static in (False, True):
        runner = ModelRunner(tiny, num_blocks=per_seq * 4, block_size=block_size, max_num_seqs=16,
                             max_num_tokens=32)
        graphs = runner.make_mixed_graphs()
        runner.execute([SeqChunk(prompts[i], 0, tables[i]) for i in (0, 1)])
        got = []
        for make in steps:
            chunks = make()
            if use_static:
                got.append(graphs.run(chunks, [c.needs_logits for c in chunks]))
            else:
                got.append(runner.execute(chunks))
        results.append(got)
        assert not runner.kv_cache.key_cache[:, per_seq * 4:].any()
    for eager, static in zip(*results, strict=True):
        assert static.shape == eager.shape
        assert torch.allclose(static, eager, atol=1e-4, rtol=1e-4)
    assert results[0][0].shape[0] == 3  # the chunk that wants no logits got no row


def test_chunks_without_logits_get_no_rows(tiny: LoadedModel) -> None:
    runner = ModelRunner(tiny, num_blocks=8, block_size=4)
    ids = list(range(1000, 1010))
    all_rows = runner.execute([SeqChunk(ids[:6], 0, [0, 1]), SeqChunk(ids[:3], 0, [2])])
    runner = ModelRunner(tiny, num_blocks=8, block_size=4)
    some = runner.execute([SeqChunk(ids[:6], 0, [0, 1], needs_logits=False), SeqChunk(ids[:3], 0, [2])])
    assert some.shape == (1, runner.vocab_size)
    assert torch.allclose(some[0], all_rows[1], atol=1e-5)
    none = runner.execute([SeqChunk(ids[6:8], 6, [0, 1], needs_logits=False)])
    assert none.shape == (0, runner.vocab_size)
