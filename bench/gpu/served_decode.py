#!/usr/bin/env python3
"""Decode time per token of a model served by a running cluster, at batch 1 and 64, beside the
engine's bandwidth floor.

    python3 bench/gpu/served_decode.py --address 127.0.0.1:50051 --preset qwen2.5-7b \
        --floor-json $OUT/families.json [--prompt-tokens 500] [--max-tokens 96] [--variant async]

For each batch size B, B requests are sent at once through the SDK, each a prompt of
``--prompt-tokens`` token ids generating ``--max-tokens`` tokens (EOS ignored). The decode phase
is where every request of the batch is decoding: from the moment the last of them got its first
token. Each request's decode time per token is the time between its first token inside that
phase and its last token, over the tokens between; the median over the batch is printed beside
the floor that ``bench/gpu/families.py`` measured for the same preset, batch and context on the
same card (weights plus KV bytes a step reads over the measured copy bandwidth). The context of
the decode phase is the prompt plus the tokens generated so far, so the default prompt of 500
tokens and 96 output tokens keep it near the floor's 512.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

from alise.client import AsyncClient


async def one_request(client: AsyncClient, prompt: list[int], max_tokens: int, tag: str) -> list[tuple[float, int]]:
    """(arrival time, tokens in the chunk) of each streamed chunk."""
    arrivals = []
    async for chunk in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                       request_id=tag, timeout_s=300):
        arrivals.append((time.perf_counter(), len(chunk.token_ids)))
    return arrivals


def decode_tpot_s(streams: list[list[tuple[float, int]]]) -> list[float]:
    """Per request: seconds per token inside the phase where every request decodes."""
    phase_start = max(s[0][0] for s in streams)
    tpots = []
    for s in streams:
        inside = [(t, n) for t, n in s if t > phase_start]
        if len(inside) < 2:
            continue
        tokens = sum(n for _, n in inside[1:])
        tpots.append((inside[-1][0] - inside[0][0]) / tokens)
    return tpots


async def run_batch(address: str, batch: int, prompt_tokens: int, max_tokens: int, vocab: int) -> dict:
    rng = random.Random(batch)
    prompts = [[rng.randrange(1000, vocab) for _ in range(prompt_tokens)] for _ in range(batch)]
    async with AsyncClient(address) as client:
        await one_request(client, prompts[0][:64], 4, f"warm-{batch}-{time.time_ns()}")
        started = time.perf_counter()
        streams = await asyncio.gather(*(one_request(client, p, max_tokens, f"b{batch}-{i}-{time.time_ns()}")
                                         for i, p in enumerate(prompts)))
        wall = time.perf_counter() - started
    tpots = decode_tpot_s(streams)
    return dict(batch=batch, requests=len(streams), measured=len(tpots), wall_s=wall,
                tpot_ms_median=1e3 * statistics.median(tpots) if tpots else float("nan"),
                tpot_ms_p90=1e3 * sorted(tpots)[int(0.9 * (len(tpots) - 1))] if tpots else float("nan"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--preset", required=True)
    p.add_argument("--floor-json", default="", help="bench/gpu/families.py --out of the same card")
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--vocab", type=int, default=30000, help="prompt ids are drawn below this")
    p.add_argument("--variant", default="", help="a label for the served set-up (sync, async), printed and kept")
    p.add_argument("--out", default="")
    args = p.parse_args()
    floors = {}
    if args.floor_json:
        with open(args.floor_json) as f:
            for row in json.load(f)["rows"]:
                if row.get("preset") == args.preset and "error" not in row:
                    floors = {int(k[1:]): v["floor_ms"] for k, v in row.items() if k[:1] == "b" and k[1:].isdigit()}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = asyncio.run(run_batch(args.address, batch, args.prompt_tokens, args.max_tokens, args.vocab))
        row["floor_ms"] = floors.get(batch, float("nan"))
        row["ratio"] = row["tpot_ms_median"] / row["floor_ms"]
        rows.append(row)
        row["variant"] = args.variant
        label = f"{args.preset} {args.variant}".rstrip()
        print(f"served {label} batch {batch:>3}: decode {row['tpot_ms_median']:.3f} ms/token median "
              f"(p90 {row['tpot_ms_p90']:.3f}, {row['measured']}/{row['requests']} requests) vs floor "
              f"{row['floor_ms']:.3f} ms -> {row['ratio']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=args.preset, variant=args.variant, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
