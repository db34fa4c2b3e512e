"""Tensor parallelism on two GPUs (NCCL): a Llama with GQA and an OPT at TP=2, loaded by slice
from a checkpoint, run as a worker serves (kernel plan, decode and mixed-step CUDA graphs
captured per rank with their all-reduces inside), against the same model on one GPU.

The schedule is tests/familycases.py's (prompts, a prompt in two chunks beside decodes, a late
joiner, decodes), each chunk's last logits as serving asks for them. Bound, in the model's
dtype: TP=2's error against transformers' float32 forward is at most twice one GPU's, plus
1e-3 x max |logit| (the all-reduces sum the partial products in another order). Needs 2 GPUs.
"""

from __future__ import annotations

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

from alise.worker.model.loader import load_model
from alise.worker.model.runner import ModelRunner
from familycases import BLOCK_SIZE, hf_logits, make_sequences, max_error, run_schedule
from tinymodels import make_tiny_model_dir
from tpkit import spawn_ranks

NUM_BLOCKS = 64
CASES = {"llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2)),
         "opt": ("opt", dict(num_attention_heads=8))}
SIZES = dict(hidden_size=512, num_hidden_layers=2, initializer_range=0.05)


def serve_schedule(loaded) -> dict:
    runner = ModelRunner(loaded, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_tokens=64)
    assert runner.decode_graphs is not None and runner.decode_graphs.is_captured
    tokens, tables = make_sequences(seed=1, vocab_size=loaded.config.vocab_size, num_blocks=NUM_BLOCKS)
    return run_schedule(runner, tokens, tables, every_position=False)


def gpu_rank(rank: int, world_size: int, store: str, path: str, out: str) -> None:
    from alise.worker.model.parallel import init_tensor_parallel

    tp = init_tensor_parallel(rank, world_size, store, f"cuda:{rank}", 0)
    got = serve_schedule(load_model(path, device=f"cuda:{rank}", dtype="bfloat16", tp=tp))
    if rank == 0:
        torch.save({n: [(p, row.cpu()) for p, row in rows] for n, rows in got.items()}, out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tp2_on_two_gpus_matches_one_gpu(name: str, tmp_path) -> None:
    family, overrides = CASES[name]
    extra = dict(ffn_dim=1024) if family == "opt" else dict(intermediate_size=1024)
    path = str(make_tiny_model_dir(tmp_path / "model", family, **SIZES, **extra, **overrides))
    spawn_ranks(gpu_rank, 2, tmp_path, path, str(tmp_path / "tp2.pt"))
    tp2 = torch.load(tmp_path / "tp2.pt")
    one = {n: [(p, row.cpu()) for p, row in rows] for n, rows in
           serve_schedule(load_model(path, device="cuda:0", dtype="bfloat16")).items()}
    full = load_model(path, device="cuda:0", dtype="float32")
    tokens, _ = make_sequences(seed=1, vocab_size=full.config.vocab_size, num_blocks=NUM_BLOCKS)
    reference = {n: r.cpu() for n, r in hf_logits(full.model, tokens, device="cuda:0").items()}
    scale = max(r.abs().max().item() for r in reference.values())
    one_err, tp2_err = max_error(one, reference), max_error(tp2, reference)
    print(f"{name}: one GPU {one_err:.3g}, TP=2 {tp2_err:.3g} (max |logit| {scale:.3g})")
    assert tp2_err <= 2 * one_err + 1e-3 * scale
