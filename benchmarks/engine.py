"""Baton engine vs Hugging Face `generate` on CPU: decode throughput and TTFT at several batch sizes.

    python benchmarks/engine.py            # tiny + ~100M random Llama, batch 1/8/32, 3 repeats
    python benchmarks/engine.py --quick    # shorter generations, 1 repeat
    python benchmarks/engine.py --models tiny --batches 1,32 --threads 2
    python benchmarks/engine.py --models smollm2 --dtypes float32 --gemm torch,onednn   # the real model, both GEMMs

Models are created offline (`baton model tiny`) in a temporary directory unless `--model-dir` points at
existing ones. Every request in a batch has a different prompt length (16..47 tokens) and generates exactly
`--max-tokens` tokens (eos ignored), so both sides do the same work; HF gets the batch left-padded in one
`generate` call. Throughput = generated tokens / wall time of the whole batch; TTFT = time from submitting the
batch to a request's first token (HF: to the first streamer callback with new tokens). Medians over repeats.

Both sides run with the same number of torch threads (`--threads`, default 1; Baton's event loop and engine
thread are Python threads around that), in the same dtype (`--dtypes`: float32 and bfloat16 by default), greedy,
KV cache on; HF uses its `sdpa` attention. Each
batch size is warmed up on both sides first, then Baton and HF runs alternate (one of each per repeat), so
load from other processes on the machine affects both alike; `ratio` is the median of the per-repeat ratios.
`--gemm torch,onednn` runs one Baton engine per GEMM (`worker/engine/gemm.py`: plain `F.linear` vs oneDNN on
weights reordered at load) in the same alternation; `smollm2` is the real SmolLM2-135M-Instruct (`baton model
smollm2`, cached), `tiny`/`100m` random Llamas.

`GFLOP/s` is Baton's decode rate times the model's matmul FLOPs per token, and `of peak` its share of the
machine's measured matmul rate in that dtype (`matmul_peak`): how much of the CPU the decode step really uses.
bf16 pays only on CPUs with native bf16 (AVX512-BF16/AMX); elsewhere torch emulates it and it is slower.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    from baton.worker.tiny import CORPUS

    ids = tokenizer.encode(CORPUS * 4, add_special_tokens=False)
    out = []
    for i in range(batch):
        n = 16 + (i * 7) % 32
        start = (i * 37) % (len(ids) - n)
        out.append(ids[start:start + n])
    return out


async def _baton_run(engine, prompts, max_tokens) -> tuple[float, float]:
    from baton.worker.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttfts = []

    async def one(i, p):
        first = None
        n = 0
        async for out in engine.generate(GenerationRequest(f"b{time.monotonic_ns()}-{i}", p, params)):
            if first is None:
                first = time.perf_counter() - t0
            n += len(out.token_ids)
        ttfts.append(first)
        return n

    counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    return sum(counts) / wall, statistics.median(ttfts)


def _hf_run(model, prompts, max_tokens, pad_id) -> tuple[float, float]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    L = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls = 0
            self.first = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken() if len(prompts) == 1 else None
    t0 = time.perf_counter()
    if streamer is None:  # streamers only take batch 1: time a 1-token generate for TTFT instead
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad_id,
                           eos_token_id=None)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=None, streamer=streamer)
    wall = time.perf_counter() - t0
    if streamer is not None:
        ttft = streamer.first - t0
    generated = (out.shape[1] - L) * len(prompts)
    return generated / wall, ttft


def matmul_peak(dtype, threads: int, repeats: int = 5) -> float:
    """The machine's measured matmul rate (GFLOP/s) in `dtype`: the best of plain torch matmuls at the shapes a
    decode step uses (32 or 256 rows against a 2048x2048 weight), with the benchmark's thread count."""
    import torch

    best = 0.0
    for m in (32, 256):
        a = torch.randn(m, 2048).to(dtype)
        w = torch.randn(2048, 2048).to(dtype)
        for _ in range(3):
            a @ w
        n = max(4, 2000 // m)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                a @ w
            best = max(best, 2 * m * 2048 * 2048 * n / (time.perf_counter() - t0) / 1e9)
    return best


def _one_matmul(dtype) -> float:
    """GFLOP/s of one 32x2048 @ 2048x2048 matmul after a warm-up (a quick probe, not a peak)."""
    import torch

    a, w = torch.randn(32, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ w
    t0 = time.perf_counter()
    a @ w
    return 2 * 32 * 2048 * 2048 / (time.perf_counter() - t0) / 1e9


def _flops_per_token(engine) -> float:
    """Matmul FLOPs of one token through the model (2 x the weights every token multiplies: projections, MLP,
    lm_head); attention over the short contexts here adds little and is left out."""
    m = engine.model
    projections = [m.lm_head] + [p for layer in m.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    n = sum(p.numel for p in projections)
    if m.fold_rope:  # the folded rotate_half rows are extra work this engine chose, not model FLOPs
        cfg = m.cfg
        n -= len(m.layers) * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim * cfg.hidden_size
    return 2.0 * n


def _bench_model(path: Path, label: str, batches: list[int], max_tokens: int, repeats: int,
                 dtype_name: str = "float32", gemms: tuple[str | None, ...] = (None,)) -> list[dict]:
    import contextlib

    import torch
    from baton.worker.engine.engine import BatonEngine
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    rows = []
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    pad_id = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    engines = {}
    for kind in gemms:  # one engine per GEMM (None: the engine's own choice)
        engine = BatonEngine.from_pretrained(path, max_num_seqs=max(batches), max_model_len=512, dtype=dtype,
                                             gemm_kind=kind)
        engines[engine.model.gemm] = engine
    first = next(iter(engines.values()))
    flops = _flops_per_token(first)
    prompts_by_batch = {b: _prompts(first.tokenizer, b) for b in batches}

    async def run_all():
        results = {}
        async with contextlib.AsyncExitStack() as stack:
            for engine in engines.values():
                await stack.enter_async_context(engine)
            for b in batches:
                for engine in engines.values():  # warm-up at this batch size, every side
                    await _baton_run(engine, prompts_by_batch[b], 4)
                _hf_run(hf, prompts_by_batch[b], 4, pad_id)
                runs = []
                for _ in range(repeats):  # interleaved, so a change in machine load hits every side alike
                    run = {kind: await _baton_run(engine, prompts_by_batch[b], max_tokens)
                           for kind, engine in engines.items()}
                    run["hf"] = _hf_run(hf, prompts_by_batch[b], max_tokens, pad_id)
                    runs.append(run)
                results[b] = runs
        return results

    every = asyncio.run(run_all())
    for b in batches:
        hf_runs = [r["hf"] for r in every[b]]
        ht = statistics.median(r[0] for r in hf_runs)
        hf_ttft = statistics.median(r[1] for r in hf_runs)
        for kind in engines:
            baton = [r[kind] for r in every[b]]
            bt = statistics.median(r[0] for r in baton)
            bf = statistics.median(r[1] for r in baton)
            ratio = statistics.median(x[0] / y[0] for x, y in zip(baton, hf_runs))
            vs_torch = (statistics.median(r[kind][0] / r["torch"][0] for r in every[b]) if "torch" in engines
                        else None)
            rows.append({"model": label, "dtype": dtype_name, "gemm": kind, "batch": b, "baton_tps": bt,
                         "hf_tps": ht, "ratio": ratio, "vs_torch": vs_torch, "baton_ttft": bf * 1000,
                         "hf_ttft": hf_ttft * 1000, "gflops": bt * flops / 1e9})
            print(f"  {label} {dtype_name} gemm {kind} batch {b}: baton {bt:.0f} tok/s, hf {ht:.0f} tok/s",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: fewer tokens, 1 repeat")
    ap.add_argument("--models", default="tiny,100m",
                    help="comma list of tiny,100m (random) and smollm2 (the real model) (default tiny,100m)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--model-dir", default=None, help="directory holding (or receiving) tiny/ and 100m/ models")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma list of float32,bfloat16: both engines run in each (default both; bfloat16 only "
                    "where the CPU has native bf16)")
    ap.add_argument("--force-bf16", action="store_true", help="run bfloat16 even where torch emulates it")
    ap.add_argument("--gemm", default=None,
                    help="comma list of torch,onednn: one Baton engine per GEMM, side by side (default: the "
                    "engine's own choice)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from baton.worker.tiny import ensure_benchmark_model

    max_tokens = args.max_tokens or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = [int(b) for b in args.batches.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    from baton.worker.engine.engine import cpu_has_bf16

    note = ""
    if "bfloat16" in dtypes and not cpu_has_bf16() and not args.force_bf16:
        # without AVX512-BF16/AMX torch emulates bf16: a 100M-model run would take hours and show only that
        dtypes.remove("bfloat16")
        note = (f"bfloat16 skipped: this CPU has no native bf16 (one 32x2048x2048 matmul: "
                f"{_one_matmul(torch.bfloat16):.1f} GFLOP/s in bf16 vs {_one_matmul(torch.float32):.1f} in fp32; "
                "--force-bf16 runs it anyway)")
        print(note, file=sys.stderr, flush=True)
    peaks = {dt: matmul_peak(getattr(torch, dt), args.threads) for dt in dtypes}
    print("matmul peak (GFLOP/s): " + ", ".join(f"{dt} {p:.0f}" for dt, p in peaks.items())
          + f"; native bf16: {'yes' if cpu_has_bf16() else 'no (torch emulates it)'}", file=sys.stderr, flush=True)

    tmp = None
    base = Path(args.model_dir) if args.model_dir else Path(tmp := tempfile.mkdtemp(prefix="baton-bench-"))
    rows = []
    gemms = tuple(g.strip() for g in args.gemm.split(",")) if args.gemm else (None,)
    for size in models:
        path = ensure_benchmark_model(size, base)
        for dt in dtypes:
            rows += _bench_model(path, size, batches, max_tokens, repeats, dt, gemms)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nBaton engine vs HF generate (CPU, {args.threads} thread(s), {max_tokens} new tokens/request, "
          f"median of {repeats}; both engines in the row's dtype)")
    print("matmul peak, GFLOP/s (plain torch matmul, 32/256 x 2048 x 2048, same threads): "
          + ", ".join(f"{dt} {p:.0f}" for dt, p in peaks.items())
          + f"; native bf16 on this CPU: {'yes' if cpu_has_bf16() else 'no'}")
    header = (f"{'model':<7} {'dtype':<9} {'gemm':<7} {'batch':>5} {'baton tok/s':>12} {'HF tok/s':>10} "
              f"{'ratio':>6} {'vs torch':>9} {'baton TTFT ms':>14} {'HF TTFT ms':>11} {'GFLOP/s':>8} {'of peak':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = f"{r['vs_torch']:>8.2f}x" if r["vs_torch"] is not None else f"{'':>9}"
        print(f"{r['model']:<7} {r['dtype']:<9} {r['gemm']:<7} {r['batch']:>5} {r['baton_tps']:>12.1f} "
              f"{r['hf_tps']:>10.1f} {r['ratio']:>5.2f}x {vs} {r['baton_ttft']:>14.1f} {r['hf_ttft']:>11.1f} "
              f"{r['gflops']:>8.1f} {r['gflops'] / peaks[r['dtype']]:>7.0%}")
    if note:
        print(note)
    fp, bf = "float32", "bfloat16"
    for m in models:
        for b in batches:
            x = [r for r in rows if r["model"] == m and r["batch"] == b]
            by = {r["dtype"]: r for r in x}
            if fp in by and bf in by:
                print(f"bf16 / fp32, {m} batch {b}: baton {by[bf]['baton_tps'] / by[fp]['baton_tps']:.2f}x, "
                      f"HF {by[bf]['hf_tps'] / by[fp]['hf_tps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
