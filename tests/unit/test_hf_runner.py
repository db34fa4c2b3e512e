"""The transformers baseline runner must give the paged runner's next-token logits, step by step.

Both runners share one model's weights and see the same chunks; per step, max |hf - paged| <=
1e-4 * max(1, max |paged logit|) in float32 (they differ only in summation order; a wrong position,
mask or stale cache row moves logits by O(0.1), see ``test_a_stale_cache_is_caught``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from alise.worker.model.chunk import SeqChunk
from alise.worker.model.hf_runner import TransformersRunner
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

BLOCK_SIZE = 4
NUM_BLOCKS = 64
# Small, so the LM head does not dominate the run time; the comparison does not depend on it.
VOCAB_SIZE = 1024

# sequence -> tokens fed this step ("restart" feeds the whole sequence again from position 0).
# Covers: batch-1 prefills beside a batched decode, "c" prefilled in two chunks, "d"/"e" joining
# late, "a" leaving for good (released), "b" sitting out two steps while the others keep decoding
# (its row must survive the rebuilt batch), an unchanged decode set (batched cache reused), and
# "c" recomputed from scratch after a drop.
SCHEDULE = [
    {"a": 9, "b": 6, "c": 5},
    {"a": 1, "b": 1, "c": 4},
    {"a": 1, "b": 1, "c": 1, "d": 7},
    {"b": 1, "c": 1, "d": 1},
    {"c": 1, "d": 1},
    {"c": 1, "d": 1, "e": 3},
    {"c": "restart", "d": 1, "e": 1, "b": 1},
    {"b": 1, "c": 1, "d": 1, "e": 1},
    {"b": 1, "c": 1, "d": 1, "e": 1},
]
RELEASED_AFTER = {2: ["a"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Matmuls this small gain nothing from threads, and on a busy machine their sync costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Gemma 2 and Mistral: sliding windows (5 tokens) over a left-padded batched cache, soft-caps.
@pytest.fixture(scope="module", params=["llama", "opt", "gemma2", "mistral"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param,
                                              initializer_range=0.1, vocab_size=VOCAB_SIZE)))


def run_schedule(loaded: LoadedModel, *, corrupt: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(paged, hf) logits of every step of SCHEDULE."""
    rng = random.Random(0)
    paged = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    hf = TransformersRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    tables = {name: blocks[8 * i:8 * (i + 1)] for i, name in enumerate("abcde")}
    tokens = {name: [] for name in tables}
    cached = {name: 0 for name in tables}
    results = []
    for step_idx, step in enumerate(SCHEDULE):
        chunks, names = [], []
        for name, num in step.items():
            if num == "restart":
                cached[name] = 0
            else:
                tokens[name] += [rng.randrange(loaded.config.vocab_size) for _ in range(num)]
            chunks.append(SeqChunk(tokens[name][cached[name]:], cached[name], tables[name]))
            names.append(name)
            cached[name] = len(tokens[name])
        if corrupt and step_idx == 4:
            with torch.inference_mode():  # row 0 is "b", about to sit out two steps and come back
                hf._batch.cache.layers[0].keys[0, :, -2] += 1.0
        results.append((paged.execute(chunks), hf.execute(chunks, seq_ids=names)))
        for name in RELEASED_AFTER.get(step_idx, []):
            hf.release(name)
    assert hf.num_cached_seqs == 4
    return results


def test_matches_the_paged_runner_step_by_step(loaded: LoadedModel) -> None:
    for step_idx, (expected, actual) in enumerate(run_schedule(loaded)):
        tol = 1e-4 * max(1.0, expected.abs().max().item())
        err = (actual - expected).abs().max().item()
        assert err <= tol, f"step {step_idx}: max error {err:.3g} > {tol:.3g}"


def test_a_stale_cache_is_caught(loaded: LoadedModel) -> None:
    errors = [(actual - expected).abs().max().item() for expected, actual in run_schedule(loaded, corrupt=True)]
    assert max(errors[4:]) > 1e-2


def test_a_chunk_that_does_not_continue_its_cache_is_refused(loaded: LoadedModel) -> None:
    hf = TransformersRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    hf.execute([SeqChunk([1, 2, 3], 0, [0])], seq_ids=["x"])
    with pytest.raises(ValueError, match="start_pos 4 but 3 positions"):
        hf.execute([SeqChunk([4], 4, [0, 1])], seq_ids=["x"])
    hf.release("x")
    with pytest.raises(ValueError, match="start_pos 3 but 0 positions"):
        hf.execute([SeqChunk([4], 3, [0])], seq_ids=["x"])
