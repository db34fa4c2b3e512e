"""Characters per token over the real prompts and outputs in ``../shared/data``: the measurement
behind the text-prompt bound (``alise.scheduler.request_checks.MAX_CHARS_PER_TOKEN``).

A text prompt longer than ``max_model_len * MAX_CHARS_PER_TOKEN`` characters is refused before
it is tokenized: it cannot fit the context unless its tokens are longer than that on average.
This script reports, per file set and per tokenizer, how many characters a token covers in
each text (the whole text's characters over its tokens): the mean, high percentiles and the
largest, and the longest single token of each vocabulary. Tokenizers: the MiniLM WordPiece
tokenizer the presets use, and a byte-level BPE (GPT-2's scheme, 32k merges) trained on these
very files, which compresses them better than a general-purpose one would (a pessimistic case
for the bound).

    python bench/http_prompt_chars.py
    python bench/http_prompt_chars.py --data ../shared/data --vocab 32000
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np


def read_texts(data: Path) -> dict[str, list[str]]:
    """{set name: texts}: AlpacaEval instructions (once) and outputs (every model), ShareGPT prompts."""
    sets: dict[str, list[str]] = {"alpaca instructions": [], "alpaca outputs": [], "sharegpt prompts": []}
    for i, path in enumerate(sorted((data / "alpaca_eval").glob("*.jsonl.gz"))):
        with gzip.open(path, "rt") as f:
            for line in f:
                row = json.loads(line)
                if i == 0:
                    sets["alpaca instructions"].append(row["instruction"])
                sets["alpaca outputs"].append(row["output"])
    for path in sorted((data / "sharegpt").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            sets["sharegpt prompts"] += [json.loads(line)["prompt"] for line in f]
    return {name: [t for t in texts if t.strip()] for name, texts in sets.items()}


def byte_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def ratios(encode, texts: list[str]) -> np.ndarray:
    counts = np.array([max(1, len(ids)) for ids in encode(texts)], dtype=float)
    return np.array([len(t) for t in texts], dtype=float) / counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--vocab", type=int, default=32000, help="merges of the byte-level BPE trained here")
    args = p.parse_args()
    from alise.modelinfo.tokenizer import minilm_tokenizer

    sets = read_texts(Path(args.data))
    everything = [t for texts in sets.values() for t in texts]
    wordpiece = minilm_tokenizer()
    bpe = byte_bpe(everything, args.vocab)
    tokenizers = {
        "MiniLM WordPiece": (lambda ts: wordpiece(ts, add_special_tokens=False)["input_ids"],
                             max(len(wordpiece.convert_tokens_to_string([t])) for t in wordpiece.get_vocab())),
        f"byte-level BPE {args.vocab // 1000}k": (lambda ts: [e.ids for e in bpe.encode_batch(ts)],
                                                  max(len(bpe.decode([i])) for i in range(bpe.get_vocab_size()))),
    }
    print(f"characters per token, per text ({len(everything)} texts, "
          f"{sum(map(len, everything)) / 1e6:.1f} M characters)")
    print(f"{'tokenizer':<20}{'texts':<22}{'n':>6}{'mean':>7}{'p99':>7}{'p99.9':>7}{'max':>7}")
    for name, (encode, longest) in tokenizers.items():
        for set_name, texts in {**sets, "all": everything}.items():
            r = ratios(encode, texts)
            print(f"{name:<20}{set_name:<22}{len(r):>6}{r.mean():>7.2f}{np.percentile(r, 99):>7.2f}"
                  f"{np.percentile(r, 99.9):>7.2f}{r.max():>7.2f}")
        print(f"{name:<20}longest token in the vocabulary: {longest} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
