"""The fp8 KV cache (``kv_cache_dtype="fp8_e4m3"``) on the CPU: logits, block count, KV moves, flags.

Logits: each family of tests/familycases.py (Hugging Face's default initializer range 0.02)
feeds a 10-token prompt, then a 30-token continuation one token a step, teacher-forced; the
logits of every step with fp8 pages are compared with the same run over float32 pages,
``||fp8 - ref|| / ||ref||`` over the whole continuation. Measured on the CPU (`pytest -s
tests/unit/test_fp8_kv.py` prints them; docs/fp8_kv.md), with every query attending to fp8
K/V, a prompt's own included: llama3-rope 1.3e-2, qwen2-tied 1.3e-2, mistral 1.9e-2, qwen2
1.9e-2, mixtral 2.0e-2, phi3 2.1e-2, phi3-longrope-partial 2.2e-2, qwen3 2.6e-2, qwen3-moe
2.6e-2, gemma2 3.6e-2, gemma3 5.2e-2.
e4m3 keeps 3 mantissa bits (a value's rounding error up to 2**-4 of it), and these 2-layer
models pass that noise to their O(1) logits almost undamped; the bound leaves room for it and
still catches a page read wrongly (a wrong block or an unconverted byte gives errors of order 1).
"""

from __future__ import annotations

import random

import pytest
import torch

from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
from alise.core.job import KvPlace
from alise.core.sampling import SamplingParams
from alise.worker.config import WorkerConfig
from alise.worker.kernels.triton_unified import UnifiedConfig
from alise.worker.model.chunk import SeqChunk
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.kernel_plan import KernelPlan
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from alise.worker.model.serving import size_kv_cache
from familycases import BLOCK_SIZE as SCHEDULE_BLOCK_SIZE
from familycases import CASES, NUM_BLOCKS, all_logits, make_sequences
from tinymodels import make_tiny_model_dir

PROMPT, CONTINUATION, BLOCK_SIZE = 10, 30, 4
#: ``||fp8 - fp32|| / ||fp32||`` of the continuation's logits, per family (measured up to 5.2e-2).
BOUND = 7e-2
GREEDY = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)


def teacher_forced(loaded, ids: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """Logits after each token of ``ids`` past the prompt, fed one a step."""
    table = list(range(-(-len(ids) // BLOCK_SIZE)))
    runner = ModelRunner(loaded, num_blocks=len(table) + 1, block_size=BLOCK_SIZE, max_num_seqs=2,
                         max_num_tokens=16, kv_cache_dtype=kv_cache_dtype)
    assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv_cache_dtype == "fp8_e4m3" else torch.float32)
    rows = [runner.execute([SeqChunk(ids[:PROMPT], 0, table)])]
    rows += [runner.execute([SeqChunk([ids[p]], p, table)]) for p in range(PROMPT, len(ids))]
    return torch.cat(rows)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp8_logits_track_the_float32_cache(name: str, tmp_path) -> None:
    family, overrides, max_model_len = CASES[name]
    loaded = load_model(str(make_tiny_model_dir(tmp_path, family, **overrides)), max_model_len=max_model_len)
    rng = random.Random(name)
    ids = [rng.randrange(1000, loaded.config.vocab_size) for _ in range(PROMPT + CONTINUATION)]
    ref = teacher_forced(loaded, ids, "auto")
    got = teacher_forced(loaded, ids, "fp8_e4m3")
    error = ((got - ref).norm() / ref.norm()).item()
    print(f"{name}: fp8 KV logits relative error {error:.2e}")
    # Nonzero: the pages really are fp8 (float32 pages would give exactly the reference).
    assert 1e-4 < error < BOUND


@pytest.mark.parametrize("name", ["gemma2", "llama3-rope", "qwen3"])
@pytest.mark.parametrize("min_batched_fresh", [0, 3], ids=["fresh-one-by-one", "fresh-batched"])
def test_fresh_prompts_attend_to_their_kv_as_the_pages_hold_it(name: str, min_batched_fresh: int,
                                                                tmp_path) -> None:
    # The unified path (the kernels' contract: every key read from the pages) against the per-chunk
    # path, where a fresh prompt reads no page: on fp8 pages they agree only if that prompt attends
    # to its own K/V rounded to fp8 too (as computed, they differed by 1.7e-2 to 3.7e-2 here).
    family, overrides, max_model_len = CASES[name]
    loaded = load_model(str(make_tiny_model_dir(tmp_path, family, **overrides)), max_model_len=max_model_len)
    tokens, tables = make_sequences(seed=2, vocab_size=loaded.config.vocab_size)
    logits = []
    for unified in (False, True):
        runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=SCHEDULE_BLOCK_SIZE, max_num_seqs=8,
                             max_num_tokens=32, kv_cache_dtype="fp8_e4m3")
        runner.min_batched_fresh = min_batched_fresh
        if unified:
            runner.ops.plan = KernelPlan(unified={16: UnifiedConfig(), 32: UnifiedConfig()})
        logits.append(all_logits(runner, tokens, tables))
    error = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
    assert error < 1e-5, f"{name}: per-chunk vs unified path on fp8 pages {error:.2e}"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("fp8-llama"), "llama", hidden_size=128,
                               num_attention_heads=2, num_key_value_heads=1)
    return load_model(str(path), device="cpu")


def test_block_count_doubles_at_the_same_memory(loaded) -> None:
    config = loaded.config
    assert KVCache.block_bytes(config, 16, torch.float8_e4m3fn) * 2 == KVCache.block_bytes(config, 16, torch.float16)
    budget = 10 * KVCache.block_bytes(config, 16, torch.float16) + 5
    assert KVCache.num_blocks_for_budget(config, 16, torch.float8_e4m3fn, budget) == 20
    assert KVCache.num_blocks_for_budget(config, 16, torch.float16, budget) == 10
    # The worker sizes its cache from the budget by the pages' dtype (the model is float32 here).
    auto = size_kv_cache(loaded, WorkerConfig(kv_cache_mib=1, block_size=4))
    fp8 = size_kv_cache(loaded, WorkerConfig(kv_cache_mib=1, block_size=4, kv_cache_dtype="fp8_e4m3"))
    assert fp8 == 4 * auto


def make_engine(loaded, num_blocks: int = 48, num_host_blocks: int = 32):
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=8, kv_cache_dtype="fp8_e4m3")
    engine = make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len,
                                num_host_blocks=num_host_blocks)
    return engine, runner


def run_step(engine) -> None:
    chunks = {j: s.num_tokens - s.num_cached for j, s in engine.seqs.items() if not s.paused}
    engine.step(StepPlan(0, run_step=True, chunks=chunks))


def page_bytes(runner: ModelRunner, table: list[int]) -> torch.Tensor:
    index = torch.tensor(table)
    cache = runner.kv_cache
    return torch.stack([pages.view(torch.uint8).index_select(1, index) for pages in (cache.key_cache,
                                                                                     cache.value_cache)])


def test_host_swap_round_trips_fp8_pages_byte_for_byte(loaded) -> None:
    engine, runner = make_engine(loaded)
    engine.apply([Admit("a", list(range(5, 34)), GREEDY)])
    for _ in range(4):
        run_step(engine)
    seq = engine.seqs["a"]
    before = page_bytes(runner, seq.block_table)
    assert before.any()
    assert engine.apply([Pause("a", KvAction.SWAP_TO_HOST)]) == []
    assert seq.place is KvPlace.HOST
    engine.apply([Admit("b", list(range(50, 90)), GREEDY)])  # overwrites the freed blocks
    run_step(engine)
    engine.abort(["b"])
    assert engine.apply([Resume("a")]) == []
    assert torch.equal(page_bytes(runner, seq.block_table), before)
    run_step(engine)


@pytest.mark.parametrize(("action", "needed"), [(KvAction.QUANTIZE_INT8, "1.12"), (KvAction.QUANTIZE_INT4, "0.625")])
def test_int8_and_int4_are_refused_on_fp8_pages_with_the_reason(loaded, action: KvAction, needed: str) -> None:
    engine, runner = make_engine(loaded)
    engine.apply([Admit("a", list(range(5, 34)), GREEDY)])
    run_step(engine)
    seq = engine.seqs["a"]
    table, before = list(seq.block_table), page_bytes(runner, seq.block_table)
    [refusal] = engine.apply([Pause("a", action)])
    assert f"take {needed} of the blocks of fp8 pages; swap or drop instead" in refusal.reason
    assert seq.place is KvPlace.DEVICE and seq.block_table == table
    assert torch.equal(page_bytes(runner, table), before)


def test_kv_cache_dtype_is_a_flag_of_worker_and_up() -> None:
    import argparse

    from alise.cluster import main as up_main
    from alise.worker import main as worker_main

    for module in (worker_main, up_main):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8_e4m3"
        with pytest.raises(SystemExit):
            parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"])
    args = argparse.ArgumentParser()
    worker_main.add_arguments(args)
    assert worker_main.config_from_args(args.parse_args(["--kv-cache-dtype", "fp8_e4m3"])).kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e4m3 needs runner 'paged'"):
        WorkerConfig(kv_cache_dtype="fp8_e4m3", runner="transformers")


def test_a_loaded_profile_is_fitted_to_the_pages_bytes(loaded) -> None:
    from alise.core.latency_model import LatencyModel
    from alise.worker.model.serving import fit_kv_bytes

    runner = ModelRunner(loaded, num_blocks=4, block_size=8, kv_cache_dtype="fp8_e4m3")
    float32_bytes = KVCache.block_bytes(loaded.config, 1, torch.float32)
    profile = LatencyModel(c0_s=0.01, c_ctx_s=4e-6, name="p", meta=dict(kv_bytes_per_token=float32_bytes))
    fitted = fit_kv_bytes(profile, runner)
    assert fitted.c_ctx_s == pytest.approx(1e-6) and fitted.c0_s == 0.01  # 1 byte a value, not 4
    assert fitted.meta["kv_bytes_per_token"] == float32_bytes // 4
    assert fit_kv_bytes(fitted, runner) is fitted
    assert fit_kv_bytes(LatencyModel(name="unlabelled"), runner).c_ctx_s == LatencyModel().c_ctx_s
