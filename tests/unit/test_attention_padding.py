"""The torch decode attention never lets bytes it does not attend to reach its result.

A decode batch's block tables are padded with block 0 up to the widest sequence, and a
sequence's last block has slots past its context; the torch reference gathers both. They hold
whatever is there: block 0 may belong to a job paused with int8 KV quantization, whose codes
and fp16 scales read as floats include NaN and inf, and a masked softmax weight of 0 times NaN
is NaN. So the masked keys and values are zeroed, and a poisoned page changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from alise.core.commands import Admit, KvAction, Pause, StepPlan
from alise.core.sampling import SamplingParams
from alise.worker.model import attention
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

GREEDY = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)


def poison(pages: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """A copy of ``pages`` with NaN, inf and -inf in block 0 and in every slot past a context."""
    poisoned = pages.clone()
    poisoned[0] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(pages[0].numel() // 3 + 1)[
        :pages[0].numel()].view_as(pages[0])
    block_size = pages.shape[1]
    for table, n in zip(tables.tolist(), lens.tolist(), strict=True):
        if n % block_size:
            poisoned[table[n // block_size], n % block_size:] = float("nan")
    return poisoned


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 3.0)],
                         ids=["causal", "window", "softcap"])
def test_decode_ignores_padding_and_tail_slots(window: int | None, softcap: float | None) -> None:
    torch.manual_seed(0)
    block_size, kv_heads, heads, dim = 4, 2, 4, 16
    # Block 0 is no sequence's: it only pads the shorter tables.
    tables = torch.tensor([[3, 5, 1, 7], [2, 6, 0, 0], [4, 0, 0, 0]])
    lens = torch.tensor([15, 6, 1])
    key_cache, value_cache = torch.randn(2, 8, block_size, kv_heads, dim).unbind(0)
    query = torch.randn(3, heads, dim)
    extra = dict(window=window, softcap=softcap)
    clean = attention.decode_attention(query, key_cache, value_cache, tables, lens, dim ** -0.5, **extra)
    assert clean.isfinite().all()
    got = attention.decode_attention(query, poison(key_cache, tables, lens), poison(value_cache, tables, lens),
                                     tables, lens, dim ** -0.5, **extra)
    assert torch.equal(got, clean)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("pad-llama"), "llama", hidden_size=128,
                               num_attention_heads=2, num_key_value_heads=1)
    return load_model(str(path), device="cpu")


def test_a_job_quantized_in_block_0_leaves_padded_decodes_finite(loaded) -> None:
    runner = ModelRunner(loaded, num_blocks=48, block_size=8)
    engine = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, num_host_blocks=8)
    engine.apply([Admit("a", list(range(5, 45)), GREEDY)])
    engine.step(StepPlan(0, run_step=True, chunks={"a": 40}))
    assert engine.apply([Pause("a", KvAction.QUANTIZE_INT8)]) == []
    assert engine.seqs["a"].block_table[0] == 0
    # Its codes read as float32 are not all finite: what a padded table would gather.
    assert not runner.kv_cache.key_cache[:, 0].isfinite().all()
    long_table, short_table = engine.allocator.allocate(6), engine.allocator.allocate(1)
    long_ids, short_ids = list(range(100, 141)), list(range(200, 206))
    runner.execute([SeqChunk(long_ids[:40], 0, long_table), SeqChunk(short_ids[:5], 0, short_table)])
    # The short sequence's table is padded with block 0 up to the long one's 6 blocks.
    batch = runner.execute([SeqChunk(long_ids[40:], 40, long_table), SeqChunk(short_ids[5:], 5, short_table)])
    alone = runner.execute([SeqChunk(short_ids[5:], 5, short_table)])
    assert batch.isfinite().all()
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)
