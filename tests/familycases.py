"""The per-family comparison with transformers, shared by tests/unit (CPU, float32, torch and
interpreted Triton paths) and tests/gpu (CUDA, half precision, Triton kernels and CUDA graphs).

A case is a tiny config of one family (tests/tinymodels.py) with what makes the family itself:
sliding windows of 5 tokens, soft-caps, Gemma 3's two rotary tables, longrope, routed experts.
:data:`SCHEDULE` is a mixed batch: prompts of different lengths, one fed in two chunks beside
decodes, a late joiner, decodes; sequences run to 15 tokens so every window cuts.
"""

from __future__ import annotations

import random

import torch

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.5, 2.0, 3.0],
                 long_factor=[2.0, 4.0, 8.0, 16.0], partial_rotary_factor=0.5)

#: name -> (family, config overrides, max_model_len). Larger weights than transformers' default
#: (initializer_range 0.1): logits O(1), attention far from uniform, so errors show.
CASES: dict[str, tuple[str, dict, int | None]] = {
    "llama3-rope": ("llama", dict(rope_parameters=_LLAMA3_ROPE), None),
    "qwen2": ("qwen2", {}, None),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True), None),
    "qwen3": ("qwen3", {}, None),
    "mistral": ("mistral", {}, None),
    "phi3": ("phi3", {}, None),
    # Phi-4-mini-like: half the head rotates; longrope, exact with its short factors up to 64.
    "phi3-longrope-partial": ("phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=64,
                                           rope_parameters=_LONGROPE), 64),
    "gemma2": ("gemma2", {}, None),
    "gemma3": ("gemma3", {}, None),
    "mixtral": ("mixtral", {}, None),
    "qwen3-moe": ("qwen3_moe", {}, None),
}

BLOCK_SIZE = 4
NUM_BLOCKS = 32

# Each step maps sequence -> tokens fed in that step; dict order is chunk order.
SCHEDULE = [
    {"a": 13, "b": 6, "c": 5},
    {"a": 1, "b": 1, "c": 4},
    {"a": 1, "c": 1, "d": 7, "b": 1},
    {"c": 1, "d": 1, "b": 1},
    {"d": 1, "b": 1, "c": 1},
    {"d": 1},
]


def make_sequences(seed: int, vocab_size: int, schedule: list[dict] = SCHEDULE, block_size: int = BLOCK_SIZE,
                   num_blocks: int = NUM_BLOCKS) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Random tokens for every sequence of ``schedule`` and disjoint, shuffled block tables."""
    rng = random.Random(seed)
    names = list(dict.fromkeys(name for step in schedule for name in step))
    lengths = {name: sum(step.get(name, 0) for step in schedule) for name in names}
    tokens = {name: [rng.randrange(1000, vocab_size) for _ in range(n)] for name, n in lengths.items()}
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = {}
    for name, n in lengths.items():
        k = -(-n // block_size)
        tables[name], free = free[:k], free[k:]
    return tokens, tables


def run_schedule(runner, tokens: dict[str, list[int]], tables: dict[str, list[int]], schedule: list[dict] = SCHEDULE,
                 *, every_position: bool) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Feeds ``schedule``; returns ``{name: [(position, logits)]}``: every fed position
    (``every_position``, the eager path's ``all_logits``) or each chunk's last one (as serving
    asks, through the graphs' static buffers where the runner has them)."""
    cached = dict.fromkeys(tokens, 0)
    got: dict[str, list] = {name: [] for name in tokens}
    for step in schedule:
        chunks = [runner_chunk(tokens[n][cached[n]:cached[n] + k], cached[n], tables[n]) for n, k in step.items()]
        if every_position:
            for name, logits in zip(step, runner.execute(chunks, all_logits=True), strict=True):
                got[name].extend((cached[name] + i, row) for i, row in enumerate(logits))
        else:
            for name, row in zip(step, runner.execute(chunks), strict=True):
                got[name].append((cached[name] + step[name] - 1, row))
        for name, k in step.items():
            cached[name] += k
    return got


def all_logits(runner, tokens: dict[str, list[int]], tables: dict[str, list[int]]) -> torch.Tensor:
    """Every logit ``SCHEDULE`` gives, one row a fed position (by name, then position)."""
    got = run_schedule(runner, tokens, tables, every_position=True)
    return torch.stack([row for name in sorted(got) for _, row in got[name]])


def runner_chunk(token_ids: list[int], start_pos: int, block_table: list[int]):
    from alise.worker.model.chunk import SeqChunk

    return SeqChunk(token_ids, start_pos, block_table)


def hf_logits(model: torch.nn.Module, tokens: dict[str, list[int]], device: str = "cpu") -> dict[str, torch.Tensor]:
    """transformers' own forward over each whole sequence: float32 logits per position."""
    with torch.inference_mode():
        return {name: model(torch.tensor([ids], device=device)).logits[0].float() for name, ids in tokens.items()}


def max_error(got: dict[str, list[tuple[int, torch.Tensor]]], reference: dict[str, torch.Tensor]) -> float:
    return max((logits - reference[name][pos]).abs().max().item() for name, rows in got.items()
               for pos, logits in rows)
