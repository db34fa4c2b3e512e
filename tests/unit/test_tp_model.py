"""Tensor parallelism on the CPU (gloo, 2 processes): every served family's logits at TP=2 equal
its logits on one device, over the mixed schedule of tests/familycases.py (prompts, a prompt fed
in two chunks beside decodes, a late joiner, decodes), eagerly and through the graphs' static
buffers (the mixed-step and decode paths serving takes).

Each rank loads its slices straight from the checkpoint (safetensors ``get_slice``; the routed
experts, stored one module per expert, each expert's slices). Besides the families' cases:
OPT, a Llama with one KV head (replicated on both ranks), and a checkpoint in shards with an
index. Tolerance: 2e-5 x max(1, max |logit|) (float32; the all-reduces only reorder sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alise.worker.model.families import describe
from alise.worker.model.loader import load_model, preset_config
from alise.worker.model.tp_load import build_sharded
from alise.worker.model.tp_shard import REPLICATED, CutRules, HeadSplit, local_spec
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


@dataclass
class RankOf:
    """What building a rank's weights reads of its group: the rank and the rank count."""

    rank: int
    world_size: int


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("qwen2", dict(tie_word_embeddings=True)),
                                                   ("opt", {}), ("phi3", {})])
def test_each_rank_reads_its_slices_of_the_checkpoint(family: str, overrides: dict, tmp_path, caplog) -> None:
    """Every parameter is read by slice (no fallback to a whole load), tied ones stay tied, and
    the two ranks' slices put back together are the checkpoint's tensors."""
    path = make_tiny_model_dir(tmp_path, family, **overrides)
    full = load_model(str(path))
    spec = describe(full.config)
    options = dict(dtype=torch.float32)
    ranks = [build_sharded(path, full.config, spec, RankOf(r, 2), torch.device("cpu"), options, 0) for r in (0, 1)]
    assert "loading it whole" not in caplog.text
    for name, param in full.model.named_parameters():
        cut = CutRules(spec, full.config, 0, 2).cut(name, tuple(param.shape))
        parts = [dict(m.named_parameters())[name] for m in ranks]
        if cut.dim is None:
            assert all(torch.equal(p, param) for p in parts) or cut.driver_only, name
        else:
            kept = sum(n for _, n in cut.ranges)
            whole = torch.cat([p.narrow(cut.dim, 0, kept) for p in parts], dim=cut.dim)
            assert whole.shape == param.shape or cut.pad_to, name
    assert (ranks[0].lm_head.weight is ranks[0].get_input_embeddings().weight) == full.config.tie_word_embeddings
    pairs = [(ranks[r].get_input_embeddings().weight, r) for r in (0, 1)]
    vocab = full.config.vocab_size
    assert torch.equal(torch.cat([w for w, _ in pairs])[:vocab], full.model.get_input_embeddings().weight)


class _SpiedFile:
    """A safe_open handle whose slices note the shape of every read, by tensor name."""

    def __init__(self, handle, reads: dict) -> None:
        self.handle, self.reads = handle, reads

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_slice(self, key: str):
        tensor, reads = self.handle.get_slice(key), self.reads

        class Spied:
            get_shape, get_dtype = tensor.get_shape, tensor.get_dtype

            def __getitem__(self, index):
                out = tensor[index]
                reads.setdefault(key, []).append(tuple(out.shape))
                return out
        return Spied()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_each_rank_reads_its_slice_of_every_expert(family: str, tmp_path, caplog, monkeypatch) -> None:
    """Routed experts stored one module per expert (Mixtral's w1/w3/w2 under block_sparse_moe,
    Qwen3-MoE's gate/up/down_proj): each rank reads half of each expert's tensors, never a
    whole one, and holds what cutting transformers' fused experts would give it. (Their TP=2
    logits: the families' cases above, which load the same way.)"""
    from safetensors import safe_open

    from alise.worker.model import tp_load
    from alise.worker.model.tp_shard import take

    path = make_tiny_model_dir(tmp_path, family)
    full = load_model(str(path))
    spec = describe(full.config)
    reads: dict[str, list[tuple[int, ...]]] = {}
    monkeypatch.setattr(tp_load, "safe_open", lambda *a, **kw: _SpiedFile(safe_open(*a, **kw), reads))
    ranks = [build_sharded(path, full.config, spec, RankOf(r, 2), torch.device("cpu"), dict(dtype=torch.float32), 0)
             for r in (0, 1)]
    assert "loading it whole" not in caplog.text
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        experts = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if ".experts." in k}
    moe_layers = sum(layer.moe for layer in spec.layers)
    assert len(experts) == moe_layers * 4 * 3  # 4 experts, gate, up and down each
    for key, (rows, columns) in experts.items():
        # Gate and up: half the rows; down: half the columns. One read a rank.
        half = (rows, columns // 2) if key.endswith(("w2.weight", "down_proj.weight")) else (rows // 2, columns)
        assert reads.get(key) == [half, half], key
    rules = [CutRules(spec, full.config, r, 2) for r in (0, 1)]
    for name, param in full.model.named_parameters():
        for r, model in enumerate(ranks):
            want = take(param.detach(), rules[r].cut(name, tuple(param.shape)), r)
            assert torch.equal(dict(model.named_parameters())[name], want), (name, r)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gemma2"])
def test_random_presets_are_drawn_in_slices(name: str) -> None:
    """A preset at TP=2: each rank draws only its slices; the replicated weights are the same
    on both ranks, the sharded ones differ (their own streams), Gemma's norms start at 0."""
    config = preset_config(name)
    spec = describe(config, 256)
    ranks = [dict(build_sharded(None, config, spec, RankOf(r, 2), torch.device("cpu"), dict(dtype=torch.float32),
                                5).named_parameters()) for r in (0, 1)]
    rules = CutRules(spec, config, 0, 2)
    for pname, p0 in ranks[0].items():
        p1 = ranks[1][pname]
        assert p0.shape == p1.shape and not p0.is_meta, pname
        if rules.cut(pname, tuple(p0.shape)) == REPLICATED:
            assert torch.equal(p0, p1), pname
        elif p0.abs().sum() > 0 and not pname.endswith("bias"):
            assert not torch.equal(p0, p1), pname
    norms = [p for n, p in ranks[0].items() if "norm" in n and n.endswith("weight")]
    assert all(torch.all(p == (0.0 if spec.norm == "rms_unit_offset" else 1.0)) for p in norms)
