"""The worker's KV moves on a real (tiny) model: swap exactness, quantization error, accounting.

Figures measured on the CPU with a tiny random Llama (float32, head_dim 64, group size 32):
KV reconstruction relative error 4.5e-3 (int8) and 7.6e-2 (int4) on Gaussian data, 4.6e-3 (int8)
on the model's own K and V. Teacher-forced logits over a 96-token continuation after a pause at
position 60, relative error against the uninterrupted run: 1.5e-3 (int8), 2.3e-2 (int4), 0 (swap)
with Hugging Face's default initializer range 0.02; with range 0.1 (4x larger keys, much sharper
attention, so errors are amplified) 8.2e-3 (int8) and 1.3e-1 (int4). Bounds leave ~3x slack.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alise.core.blocks import blocks_for, place_blocks, quantized_blocks
from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
from alise.core.job import KvPlace
from alise.core.sampling import SamplingParams
from alise.worker.engine import WorkerEngine
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.kv_offload import KvCodec, dequantize_groups, quantize_groups
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

BLOCK_SIZE = 8
GREEDY = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    # head_dim 64, so quantization uses the production group size of 32 channels.
    path = make_tiny_model_dir(tmp_path_factory.mktemp("kv-llama"), "llama", hidden_size=128,
                               num_attention_heads=2, num_key_value_heads=1)
    return load_model(str(path), device="cpu")


def make_engine(loaded, num_blocks=48, num_host_blocks=32) -> WorkerEngine:
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE)
    engine = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len,
                                num_host_blocks=num_host_blocks)
    engine.runner = runner
    return engine


def run_step(engine: WorkerEngine):
    """One step feeding every running sequence all its uncomputed tokens."""
    chunks = {j: s.num_tokens - s.num_cached for j, s in engine.seqs.items() if not s.paused}
    return engine.step(StepPlan(0, run_step=True, chunks=chunks))


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 1000, (n,), generator=g).tolist()


def kv_bytes(engine: WorkerEngine, table: list[int]) -> torch.Tensor:
    cache = engine.runner.kv_cache
    index = torch.tensor(table)
    return torch.stack((cache.key_cache[:, index], cache.value_cache[:, index])).view(torch.uint8)


def record_logits(engine: WorkerEngine, job_id: str) -> list[torch.Tensor]:
    """Wraps the runner so each step's logits row of ``job_id`` is kept."""
    seen: list[torch.Tensor] = []
    execute = engine.runner.execute

    def wrapped(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        for chunk, row in zip(chunks, logits, strict=True):
            if chunk.block_table is engine.seqs[job_id].block_table:
                seen.append(row.clone())
        return logits

    engine.runner.execute = wrapped
    return seen


def test_swap_round_trip_is_exact_and_generation_continues_identically(loaded):
    ref = make_engine(loaded)
    ref.apply([Admit("a", prompt(29), GREEDY)])
    ref_seen = record_logits(ref, "a")
    for _ in range(16):
        run_step(ref)

    eng = make_engine(loaded)
    eng.apply([Admit("a", prompt(29), GREEDY)])
    seen = record_logits(eng, "a")
    for _ in range(6):
        run_step(eng)
    seq = eng.seqs["a"]
    before = kv_bytes(eng, seq.block_table)
    num_blocks = len(seq.block_table)
    assert num_blocks == blocks_for(29 + 6 - 1, BLOCK_SIZE)

    assert eng.apply([Pause("a", KvAction.SWAP_TO_HOST)]) == []
    assert seq.place is KvPlace.HOST and not seq.block_table
    assert eng.allocator.num_free == 48 and eng.kv.num_free_host == 32 - num_blocks
    # Another job takes (and overwrites) the freed device blocks meanwhile.
    eng.apply([Admit("b", prompt(40, seed=1), GREEDY)])
    for _ in range(3):
        run_step(eng)
    eng.abort(["b"])

    assert eng.apply([Resume("a")]) == []
    assert eng.kv.num_free_host == 32
    assert torch.equal(kv_bytes(eng, seq.block_table), before)  # byte for byte
    for _ in range(10):
        run_step(eng)
    assert eng.seqs["a"].token_ids == ref.seqs["a"].token_ids
    assert len(seen) == len(ref_seen) == 16
    for ours, theirs in zip(seen, ref_seen, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, bound", [(8, 1e-2), (4, 0.2)])
def test_group_codec_reconstruction_error(bits, bound):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, 32, generator=g) * 2 + 0.5
    codes, scale, zero = quantize_groups(x, bits)
    assert codes.dtype is torch.uint8 and codes.shape[-1] == 32 * bits // 8
    y = dequantize_groups(codes, scale, zero, bits)
    # Asymmetric rounding: every value within half a step (plus fp16 rounding of scale/zero).
    step = scale.float()[..., None]
    assert ((y - x).abs() <= 0.5 * step + 2e-3 * x.abs() + 1e-3).all()
    rel = ((y - x).norm() / x.norm()).item()
    print(f"int{bits} KV reconstruction relative error {rel:.2e}")
    assert rel < bound


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_blocks_fit_the_scheduler_fraction_and_free_the_rest(loaded, bits):
    eng = make_engine(loaded)
    codec = eng.kv.mover.codec
    assert codec.group == 32 and codec.fits(bits)
    eng.apply([Admit("a", prompt(50), GREEDY)])
    run_step(eng)
    seq = eng.seqs["a"]
    full = blocks_for(50, BLOCK_SIZE)
    action = KvAction.QUANTIZE_INT8 if bits == 8 else KvAction.QUANTIZE_INT4
    assert eng.apply([Pause("a", action)]) == []
    assert len(seq.block_table) == quantized_blocks(full, bits) == place_blocks(seq.place, 50, BLOCK_SIZE)
    assert eng.allocator.num_used == quantized_blocks(full, bits)
    assert eng.apply([Resume("a")]) == []
    assert len(seq.block_table) == full and seq.place is KvPlace.DEVICE


def teacher_forced_error(loaded, actions: list[KvAction]) -> float:
    """Relative error of logits over a 96-token forced continuation after a paused KV."""
    eng = make_engine(loaded, num_blocks=64, num_host_blocks=32)
    eng.apply([Admit("a", prompt(60), GREEDY)])
    run_step(eng)
    seq = eng.seqs["a"]
    forced = [seq.token_ids[-1]] + prompt(95, seed=7)
    snapshot = kv_bytes(eng, seq.block_table).clone()

    def run() -> torch.Tensor:
        extra = eng.allocator.allocate(blocks_for(seq.num_cached + len(forced), BLOCK_SIZE)
                                       - len(seq.block_table))
        table = seq.block_table + extra
        logits = eng.runner.execute([SeqChunk(forced, seq.num_cached, table)], all_logits=True)[0]
        eng.allocator.free(extra)
        return logits

    reference = run()
    cache = eng.runner.kv_cache
    index = torch.tensor(seq.block_table)
    restored = snapshot.view(cache.key_cache.dtype)
    cache.key_cache[:, index] = restored[0].view_as(cache.key_cache[:, index])
    cache.value_cache[:, index] = restored[1].view_as(cache.value_cache[:, index])
    assert eng.apply([Pause("a", a) for a in actions] + [Resume("a")]) == []
    after = run()
    return ((after - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("actions, bound", [
    ([KvAction.QUANTIZE_INT8], 5e-3),
    ([KvAction.QUANTIZE_INT4], 7e-2),
    ([KvAction.QUANTIZE_INT8, KvAction.SWAP_TO_HOST], 5e-3),  # quantized blocks swap too
    ([KvAction.SWAP_TO_HOST], 1e-6),
])
def test_teacher_forced_logits_after_a_pause(loaded, actions, bound):
    rel = teacher_forced_error(loaded, actions)
    print(f"{'+'.join(a.value for a in actions)}: teacher-forced logits relative error {rel:.2e}")
    assert rel < bound


def test_swap_refused_whole_when_the_host_pool_is_full(loaded):
    eng = make_engine(loaded, num_host_blocks=4)
    eng.apply([Admit("a", prompt(50), GREEDY)])
    run_step(eng)
    table = list(eng.seqs["a"].block_table)
    [refusal] = eng.apply([Pause("a", KvAction.SWAP_TO_HOST)])
    assert "host pool full: 7 blocks needed, 4 free" in refusal.reason
    seq = eng.seqs["a"]
    assert seq.paused and seq.place is KvPlace.DEVICE and seq.block_table == table
    assert eng.kv.num_free_host == 4
    [refusal] = make_engine(loaded, num_host_blocks=0).apply([Admit("x", [5], GREEDY),
                                                             Pause("x", KvAction.SWAP_TO_HOST)])
    assert "host pool full" in refusal.reason


def test_codec_refuses_a_layout_that_would_not_fit_the_fraction(loaded):
    # 16-bit cache with 16-channel heads: 1 + 4/16 = 1.25 bytes per value > 9/16 of 2.
    from alise.worker.model.kv_cache import KVCache, KVShape

    cache = KVCache(KVShape(1, 2, 16), num_blocks=2, block_size=4, dtype=torch.float16, device="cpu")
    assert KvCodec(cache).group == 16 and not KvCodec(cache).fits(8)
    cache32 = KVCache(KVShape(1, 2, 16), num_blocks=2, block_size=4, dtype=torch.float32, device="cpu")
    assert KvCodec(cache32).fits(8) and KvCodec(cache32).fits(4)


ACTIONS = [KvAction.KEEP, KvAction.QUANTIZE_INT8, KvAction.QUANTIZE_INT4, KvAction.SWAP_TO_HOST,
           KvAction.DROP]


def check_engine_invariants(eng: WorkerEngine) -> None:
    held = [b for s in eng.seqs.values() for b in s.block_table]
    in_flight = [b for _, ids in eng.kv.pending_out for b in ids]
    assert len(set(held + in_flight)) == len(held) + len(in_flight)  # nothing held twice
    assert eng.allocator.num_used == len(held) + len(in_flight)       # nothing leaked
    assert eng.allocator.num_used + eng.allocator.num_free == eng.allocator.num_blocks
    host = [b for s in eng.seqs.values() for b in s.host_blocks]
    assert len(set(host)) == len(host) == eng.kv.host_allocator.num_used
    for s in eng.seqs.values():
        if s.paused and s.place is not KvPlace.NONE:
            # The scheduler's formulas count exactly what the worker holds.
            count = place_blocks(s.place, s.num_cached, BLOCK_SIZE)
            assert count == len(s.block_table) + len(s.host_blocks), (s.job_id, s.place)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["admit", "pause", "resume", "abort", "step"]),
                          st.integers(0, 3), st.integers(1, 30), st.sampled_from(ACTIONS)),
                min_size=1, max_size=30))
def test_worker_engine_accounting_under_random_commands(loaded, ops):
    eng = make_engine(loaded, num_blocks=24, num_host_blocks=12)
    for op, j, n, action in ops:
        job_id = f"j{j}"
        if op == "admit":
            eng.apply([Admit(job_id, prompt(n, seed=j), SamplingParams(
                max_tokens=n % 7 + 1, temperature=0.0, ignore_eos=True))])
        elif op == "pause":
            eng.apply([Pause(job_id, action)])
        elif op == "resume":
            eng.apply([Resume(job_id)])
        elif op == "abort":
            eng.abort([job_id])
        else:
            run_step(eng)  # also finishes jobs at max_tokens, freeing their blocks
        check_engine_invariants(eng)
    eng.abort_all()
    assert eng.allocator.num_free == 24 and eng.kv.num_free_host == 12
