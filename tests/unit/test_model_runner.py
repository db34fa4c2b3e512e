"""The paged forward pass must reproduce transformers' own forward, token for token.

Tolerance: float32 everywhere; max |ours - HF| <= 1e-4 * max(1, max |HF logit|). The two differ
only in summation order (flattened batch, paged gather, chunked prefill), which in float32 on these
tiny models stays near 1e-6; a misplaced position, a wrong mask or a stale page moves logits by
O(0.1) or more (see ``test_a_wrong_start_pos_is_caught``).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alise.worker.model.chunk import SeqChunk
from alise.worker.model.kv_cache import KVCache
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner
from tinymodels import make_tiny_model_dir

BLOCK_SIZE = 4
NUM_BLOCKS = 32

# Larger than HF's default 0.02 so logits are O(1) and attention is far from uniform: errors show.
VARIANTS = {
    "llama-gqa": ("llama", dict(initializer_range=0.1)),
    "llama-linear-rope": ("llama", dict(initializer_range=0.1, rope_theta=5e5,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "opt-prenorm": ("opt", dict(initializer_range=0.1)),
    "opt-postnorm-projected": ("opt", dict(initializer_range=0.1, do_layer_norm_before=False,
                                           word_embed_proj_dim=32)),
}

# Each step maps sequence -> tokens fed in that step; dict order is chunk order. Covers: prompts of
# different lengths, "c" prefilled in two chunks (the second beside decodes), "d" joining late,
# "a" leaving early, pure-decode steps.
SCHEDULE = [
    {"a": 13, "b": 6, "c": 5},
    {"a": 1, "b": 1, "c": 4},
    {"a": 1, "c": 1, "d": 7, "b": 1},
    {"c": 1, "d": 1, "b": 1},
    {"d": 1, "b": 1, "c": 1},
    {"d": 1},
]


def tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * max(1.0, reference.abs().max().item())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    family, overrides = VARIANTS[request.param]
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp(request.param), family, **overrides)))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(str(tiny_llama_dir))


def hf_logits(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([token_ids])).logits[0].float()


def make_sequences(seed: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Random tokens for every sequence of SCHEDULE and disjoint, shuffled block tables."""
    rng = random.Random(seed)
    lengths = {name: sum(step.get(name, 0) for step in SCHEDULE) for name in "abcd"}
    tokens = {name: [rng.randrange(1000, 30000) for _ in range(n)] for name, n in lengths.items()}
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    tables = {}
    for name, n in lengths.items():
        num = -(-n // BLOCK_SIZE)
        tables[name], free = free[:num], free[num:]
    return tokens, tables


@pytest.mark.parametrize("min_batched_fresh", [0, 3], ids=["fresh-one-by-one", "fresh-batched"])
def test_logits_match_transformers_at_every_position(loaded: LoadedModel, min_batched_fresh: int) -> None:
    # The first step's three fresh prompts share one padded attention call unless it is off (0).
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    runner.min_batched_fresh = min_batched_fresh
    tokens, tables = make_sequences(seed=1)
    num_cached = dict.fromkeys(tokens, 0)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in tokens}
    for step in SCHEDULE:
        chunks = [SeqChunk(tokens[name][num_cached[name]:num_cached[name] + n], num_cached[name], tables[name])
                  for name, n in step.items()]
        for name, logits in zip(step, runner.execute(chunks, all_logits=True), strict=True):
            got[name].append(logits)
            num_cached[name] += step[name]
    for name, ids in tokens.items():
        reference = hf_logits(loaded, ids)
        ours = torch.cat(got[name])
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max().item() <= tolerance(reference), name


def test_default_mode_returns_each_chunks_last_position(loaded: LoadedModel) -> None:
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    tokens, tables = make_sequences(seed=2)
    a, b = tokens["a"][:9], tokens["b"][:3]
    runner.execute([SeqChunk(a[:5], 0, tables["a"])])
    last = runner.execute([SeqChunk(b, 0, tables["b"]), SeqChunk(a[5:], 5, tables["a"])])
    assert last.shape == (2, runner.vocab_size) and last.dtype == torch.float32
    reference = torch.stack([hf_logits(loaded, b)[-1], hf_logits(loaded, a)[-1]])
    assert (last - reference).abs().max().item() <= tolerance(reference)


def test_a_wrong_start_pos_is_caught(loaded: LoadedModel) -> None:
    """Negative control: a decode fed one position too early must miss the reference."""
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    ids = make_sequences(seed=3)[0]["a"][:10]
    runner.execute([SeqChunk(ids[:9], 0, [0, 1, 2])])
    wrong = runner.execute([SeqChunk(ids[9:], 8, [0, 1, 2])])[0]
    reference = hf_logits(loaded, ids)[-1]
    assert (wrong - reference).abs().max().item() > 100 * tolerance(reference)


def test_kv_goes_only_into_the_sequences_blocks(tiny_llama: LoadedModel) -> None:
    runner = ModelRunner(tiny_llama, num_blocks=8, block_size=BLOCK_SIZE)
    runner.execute([SeqChunk(list(range(1000, 1006)), 0, [5, 2])])  # 6 tokens: block 5 full, block 2 half
    keys = runner.kv_cache.key_cache  # [layers, blocks, block_size, kv_heads, head_dim]
    written = keys.abs().sum(dim=(0, 3, 4)) != 0  # [blocks, block_size]
    expected = torch.zeros_like(written)
    expected[5, :] = True
    expected[2, :2] = True
    assert torch.equal(written, expected)


@pytest.mark.parametrize(("chunk", "message"), [
    (SeqChunk([1, 2, 3, 4, 5], 0, [0]), "block table of 1 blocks"),
    (SeqChunk([1], 256, list(range(8))), "exceed max_model_len 256"),
    (SeqChunk([1, 40000], 0, [0]), r"token ids must be in \[0, 30522\)"),
    (SeqChunk([1, -1], 0, [0]), "token ids"),
    (SeqChunk([1], 0, [8]), r"block ids must be in \[0, 8\)"),
    (SeqChunk([], 0, [0]), "has no tokens"),
    (SeqChunk([1], -1, [0]), "start_pos must be >= 0"),
])
def test_invalid_chunks_are_refused(tiny_llama: LoadedModel, chunk: SeqChunk, message: str) -> None:
    runner = ModelRunner(tiny_llama, num_blocks=8, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match=message):
        runner.execute([chunk])


def test_block_bytes_and_budget(tiny_llama: LoadedModel) -> None:
    config = tiny_llama.config  # 2 layers, 2 kv heads, head_dim 16
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x block_size x kv_heads x head_dim x fp32
    assert KVCache.block_bytes(config, 16, torch.float32) == per_block
    assert KVCache.block_bytes(config, 16, torch.float16) == per_block // 2
    assert KVCache.num_blocks_for_budget(config, 16, torch.float32, 10 * per_block + per_block - 1) == 10
    assert KVCache.num_blocks_for_budget(config, 16, torch.float32, per_block - 1) == 0
    cache = KVCache.from_config(config, num_blocks=10, block_size=16, dtype=torch.float32, device="cpu")
    assert cache.num_bytes == 10 * per_block


def test_fresh_batch_metadata_pads_masks_and_places_rows() -> None:
    from alise.worker.model.attention import build_attention_metadata

    # Rows: decode (1 token), fresh 3, continuing chunk 2 at position 4, fresh 2, fresh 4.
    meta = build_attention_metadata([7, 0, 4, 0, 0], [1, 3, 2, 2, 4], [[0, 1], [2], [3, 4], [5], [6]],
                                    block_size=4, device=torch.device("cpu"), min_batched_fresh=3)
    fresh = meta.fresh
    assert (fresh.num_seqs, fresh.max_len) == (3, 4)
    assert fresh.gather.tolist() == [1, 2, 3, 3, 6, 7, 7, 7, 8, 9, 10, 11]  # pads repeat the last row
    assert fresh.rows.tolist() == [1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert fresh.slots.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    mask = fresh.mask[:, 0]
    assert mask[0].tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, True, True, False], [True, True, True, False]]  # padded query: real keys
    assert mask[1, 3].tolist() == [True, True, False, False]
    assert [span.row_start for span in meta.prefills] == [4]  # the continuing chunk keeps its own call
    assert not meta.is_all_decode and meta.decode_rows.tolist() == [0]
    assert build_attention_metadata([0, 0, 0], [2, 2, 2], [[0], [1], [2]], block_size=4,
                                    device=torch.device("cpu"), min_batched_fresh=4).fresh is None
