"""Tensor parallelism on the CPU (gloo, 2 processes): every served family's logits at TP=2 equal
its logits on one device, over the mixed schedule of tests/familycases.py (prompts, a prompt fed
in two chunks beside decodes, a late joiner, decodes), eagerly and through the graphs' static
buffers (the mixed-step and decode paths serving takes).

Each rank loads its slices straight from the checkpoint (safetensors ``get_slice``; the routed
experts, stored one module per expert, are read whole and cut). Besides the families' cases:
OPT, a Llama with one KV head (replicated on both ranks), and a checkpoint in shards with an
index. Tolerance: 2e-5 x max(1, max |logit|) (float32; the all-reduces only reorder sums).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alise.worker.model.families import describe
from alise.worker.model.loader import load_model
from alise.worker.model.tp_shard import CutRules, HeadSplit, local_spec
from familycases import CASES, max_error
from tinymodels import make_tiny_model_dir, tiny_config
from tpkit import logits_rank, schedule_logits, spawn_ranks

MODES = ["eager", "graph-buffers"]
EXTRA = {"opt": ("opt", {}, None), "llama-mqa": ("llama", dict(num_key_value_heads=1), None),
         "llama-sharded-files": ("llama", dict(num_key_value_heads=1), None)}


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """All models at TP=2 in one pair of processes (starting them costs seconds)."""
    root = tmp_path_factory.mktemp("tp2")
    models = {}
    for name, (family, overrides, max_len) in (CASES | EXTRA).items():
        shard = "300KB" if name == "llama-sharded-files" else None
        path = make_tiny_model_dir(root / name, family, initializer_range=0.1, shard_size=shard, **overrides)
        models[name] = (str(path), max_len)
    assert len(list(Path(models["llama-sharded-files"][0]).glob("*.safetensors"))) > 1
    spawn_ranks(logits_rank, 2, root, models, MODES, str(root))
    return root, models


@pytest.mark.parametrize("name", sorted(CASES | EXTRA))
def test_tp2_logits_equal_one_device(tp2_run: tuple[Path, dict], name: str) -> None:
    root, models = tp2_run
    path, max_len = models[name]
    loaded = load_model(path, max_model_len=max_len)
    for mode in MODES:
        reference = schedule_logits(loaded, mode)
        got = torch.load(root / f"{name}-{mode}.pt")
        assert [[p for p, _ in rows] for rows in got.values()] == [[p for p, _ in rows] for rows in reference.values()]
        scale = max(1.0, max(row.abs().max().item() for rows in reference.values() for _, row in rows))
        err = max_error(got, {n: dict(rows) for n, rows in reference.items()})
        assert err <= 2e-5 * scale, f"{name} {mode}: max |TP=2 - TP=1| = {err:.3g}"


def test_tp2_ranks_hold_their_slices(tp2_run: tuple[Path, dict]) -> None:
    """Llama with one KV head: Q rows and o_proj columns split, K/V replicated (the one head),
    norms replicated."""
    root, models = tp2_run
    full = load_model(models["llama-mqa"][0]).model.state_dict()
    ranks = [torch.load(root / f"llama-mqa-params-{r}.pt") for r in (0, 1)]
    at = "model.layers.0."
    assert torch.equal(torch.cat([ranks[0][at + "self_attn.q_proj.weight"], ranks[1][at + "self_attn.q_proj.weight"]]),
                       full[at + "self_attn.q_proj.weight"])
    assert torch.equal(torch.cat([ranks[0][at + "self_attn.o_proj.weight"], ranks[1][at + "self_attn.o_proj.weight"]],
                                 dim=1), full[at + "self_attn.o_proj.weight"])
    for replicated in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "input_layernorm.weight"):
        assert torch.equal(ranks[0][at + replicated], full[at + replicated])
        assert torch.equal(ranks[1][at + replicated], full[at + replicated])


def test_head_split_replicates_fewer_kv_heads_than_ranks() -> None:
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 read KV head 0, ranks 2-3 KV head 1.
    splits = [HeadSplit(8, 2, r, 4) for r in range(4)]
    assert [(s.local_heads, s.local_kv_heads, s.kv_start) for s in splits] == [(2, 1, 0), (2, 1, 0), (2, 1, 1),
                                                                               (2, 1, 1)]
    assert [HeadSplit(8, 8, r, 4).kv_start for r in range(4)] == [0, 2, 4, 6]


def test_unsplittable_shapes_are_refused() -> None:
    spec = describe(tiny_config("llama"))  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="must divide the 4 attention heads"):
        local_spec(spec, 0, 3)
    with pytest.raises(ValueError, match="KV heads must divide one another"):
        HeadSplit(12, 3, 0, 4)
    rules = CutRules(spec, tiny_config("llama"), 0, 4)
    with pytest.raises(ValueError, match="must divide model.layers.0.mlp.up_proj.weight's rows"):
        rules.cut("model.layers.0.mlp.up_proj.weight", (130, 64))
