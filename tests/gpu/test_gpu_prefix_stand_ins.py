"""A resume asking for more of its prefix than the worker's cache still holds, on CUDA (Triton
attention, decode and mixed-step graphs or eager): the worker takes the cached blocks, computes
the rest in the job's first feed (longer than any mixed-step graph here, so it runs eagerly)
and gives the tokens of a job never dropped (``tests/unit/test_prefix_stand_ins.py`` on CPU).
CUDA only."""

from __future__ import annotations

import pytest
import torch

from alise.core.commands import Admit, KvAction, Pause, Resume, StepPlan
from alise.core.prefix_cache import chain_hashes
from alise.core.sampling import SamplingParams
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BS = 16


def make_engine(loaded, graphs: bool):
    runner = ModelRunner(loaded, num_blocks=32, block_size=BS, max_num_seqs=8, max_num_tokens=32,
                         fast_kernels=False, use_cuda_graphs=graphs)
    return make_worker_engine(runner, eos_token_id=None, max_model_len=loaded.max_model_len, prefix_caching=True)


def run_to_end(engine, job_id: str, *, limit_outputs: int | None = None) -> list[int]:
    """Steps (each plan's chunk every token the scheduler counts uncomputed) until the job ends
    or has ``limit_outputs`` outputs; returns its tokens."""
    seq = engine.seqs[job_id]
    while job_id in engine.seqs and (limit_outputs is None or seq.num_generated < limit_outputs):
        engine.run(StepPlan(0, run_step=True, chunks={job_id: seq.num_tokens - seq.num_cached}))
    return list(seq.token_ids)


def resumed_tokens(loaded, graphs: bool) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(a never-dropped job's tokens, the same job's dropped and resumed from a partly evicted
    prefix, the (start, tokens) of the first step's feeds after the resume)."""
    prompt = torch.randint(5, 1000, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    sampling = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = make_engine(loaded, graphs)
    ref.apply([Admit("a", prompt, sampling)])
    expected = run_to_end(ref, "a")

    eng = make_engine(loaded, graphs)
    eng.apply([Admit("a", prompt, sampling)])
    seq = eng.seqs["a"]
    run_to_end(eng, "a", limit_outputs=24)
    known = seq.num_tokens  # 64 tokens, 63 computed: 3 full blocks cached by the drop
    assert eng.apply([Pause("a", KvAction.DROP, num_reusable_tokens=known)]) == []
    eng.allocator.free(eng.kv.allocate(eng.allocator.num_uncached_free + 2))  # evicts blocks 2 and 1
    assert len(eng.allocator.match(chain_hashes(seq.token_ids, BS))) == 1
    assert eng.apply([Resume("a", num_cached_tokens=3 * BS)]) == []
    eng.run(StepPlan(0, run_step=True, chunks={"a": known - 3 * BS}))
    _, _, lens, starts = eng.last_step_shape
    return expected, run_to_end(eng, "a"), list(zip(starts, lens, strict=True))


@pytest.mark.parametrize("graphs", [True, False])
def test_a_resume_from_a_partly_evicted_prefix_gives_the_tokens_of_a_job_never_dropped(tmp_path, graphs):
    loaded = load_model(str(make_tiny_model_dir(tmp_path / "llama", "llama")), device="cuda", dtype="float16")
    expected, got, first_feeds = resumed_tokens(loaded, graphs)
    # From the one block still cached: the plan's 16 tokens and the 32 before them.
    assert first_feeds == [(BS, 3 * BS)]
    assert got == expected
