"""Prefix caching in the Baton engine: TTFT of a prompt whose long prefix was seen before vs a cold prompt.

    python benchmarks/prefix_cache.py                 # tiny and ~100M models, 400-token prefix, 15 pairs
    python benchmarks/prefix_cache.py --models 100m --prefix 800 --pairs 30

Each pair sends a cold prompt (random tokens, never seen) and then a warm one (the shared prefix plus a short
random suffix), one request at a time, both with the same total length, so the only difference is the cached
prefix. TTFT = submit to the first token, measured in-process (no HTTP). Medians over the pairs; the ratio is
cold / warm. A third column runs the warm prompts on an engine with prefix caching off: it must match cold
(the same work), which shows the win comes from the cache and nothing else.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


async def _ttft(engine, rid: str, ids: list[int]) -> float:
    from baton.worker.engine.types import GenerationRequest, SamplingParams

    t0 = time.perf_counter()
    async for _ in engine.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=1, temperature=0.0))):
        return time.perf_counter() - t0
    raise RuntimeError("no output")


async def _measure(path: Path, prefix_len: int, suffix_len: int, pairs: int, seed: int) -> dict:
    from baton.worker.engine.engine import BatonEngine

    rng = random.Random(seed)
    cached = BatonEngine.from_pretrained(path, max_model_len=prefix_len + suffix_len + 8)
    plain = BatonEngine.from_pretrained(path, max_model_len=prefix_len + suffix_len + 8, enable_prefix_caching=False)
    vocab = cached.model.cfg.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]

    def fresh(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    cold, warm, uncached = [], [], []
    async with cached, plain:
        await _ttft(cached, "seed", prefix + fresh(suffix_len))  # puts the prefix in the cache; warms up
        await _ttft(plain, "seed", prefix + fresh(suffix_len))
        for i in range(pairs):
            cold.append(await _ttft(cached, f"c{i}", fresh(prefix_len + suffix_len)))
            warm_prompt = prefix + fresh(suffix_len)
            warm.append(await _ttft(cached, f"w{i}", warm_prompt))
            uncached.append(await _ttft(plain, f"u{i}", warm_prompt))
        stats = cached.stats()
    return {"cold": statistics.median(cold), "warm": statistics.median(warm),
            "uncached": statistics.median(uncached),
            "hit_rate": stats.prefix_cache_hits_total / max(1, stats.prefix_cache_queries_total)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,100m", help="comma list of tiny,100m (random) and smollm2 (real)")
    ap.add_argument("--model-dir", default=None, help="directory holding (or receiving) tiny/ and 100m/ models")
    ap.add_argument("--prefix", type=int, default=400, help="shared prefix tokens (400)")
    ap.add_argument("--suffix", type=int, default=16, help="random tokens after it (16)")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from baton.worker.tiny import ensure_benchmark_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="baton-prefix-") as tmp:  # models go here without --model-dir
        base = Path(args.model_dir or tmp)
        for size in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = ensure_benchmark_model(size, base)
            r = asyncio.run(_measure(path, args.prefix, args.suffix, args.pairs, args.seed))
            rows.append((size, r))
            print(f"  {size}: cold {1000 * r['cold']:.1f} ms, warm {1000 * r['warm']:.1f} ms", file=sys.stderr,
                  flush=True)
    print(f"\nPrefix cache: TTFT of a {args.prefix}-token cached prefix + {args.suffix} new tokens vs "
          f"{args.prefix + args.suffix} cold tokens (median of {args.pairs}, {args.threads} thread(s), float32)")
    header = (f"{'model':<6} {'cold ms':>8} {'warm ms':>8} {'cold/warm':>10} {'warm, cache off ms':>19} "
              f"{'token hit rate':>15}")
    print(header)
    print("-" * len(header))
    for size, r in rows:
        print(f"{size:<6} {1000 * r['cold']:>8.1f} {1000 * r['warm']:>8.1f} {r['cold'] / r['warm']:>9.2f}x "
              f"{1000 * r['uncached']:>19.1f} {r['hit_rate']:>14.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
