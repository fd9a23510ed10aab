"""`baton profile`: measure the Baton engine on this machine and write a latency profile the planner reads.

    baton profile --model ~/.cache/baton/models/tiny-llama -o cpu-profile.json

It runs the engine's own forward passes (the same `build_prefill`/`build_decode` batches and paged KV cache
the serving engine uses) on a grid of batches:

- prefill: batches of 1..4 prompts of 16..N tokens -> fit ms = a + b * sum(tokens) + c * sum(tokens^2)
- decode:  batches of 1..max_num_seqs sequences at several context lengths -> fit ms = a + b * sum(context)
  + c * batch (one fit: the engine has no large-batch regime on CPU)

Each point is the median of `--repeats` timed runs after a warm-up. The fits, the KV capacity the engine would
have with the same settings, its prefill token budget and the KV bytes per token go into one profile file
(`baton.profile`), with the machine and thread count it was measured on. Progress goes to stderr.

What it does not measure: the HTTP server, streaming and the scheduler's bookkeeping between steps (the
benchmark `benchmarks/planner.py` compares the planner's prediction with a real fleet to show that gap).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def add_profile_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure the Baton engine's prefill and decode times and write a planner profile",
        description="Time the engine's prefill batches and decode steps on this machine, fit DistServe's "
                    "latency model, and write a profile for `baton plan` / spec.planner.")
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="profile file to write")
    p.add_argument("--name", help="model name in the profile (default: the directory name)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, as the worker would run with (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size, as the worker's flag")
    p.add_argument("--max-num-seqs", type=int, default=64, help="as the worker's flag (default 64)")
    p.add_argument("--max-prompt", type=int, default=1024, help="longest prompt to time (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point, median kept (default 5)")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from baton.cli import CommandError

    if args.repeats < 1 or args.max_prompt < 16 or args.max_num_seqs < 1:
        raise CommandError("--repeats must be >= 1, --max-prompt >= 16 and --max-num-seqs >= 1")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads: must be at least 1, got {args.threads}")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CommandError(f"-o: folder {out.parent} does not exist")
    import torch
    from baton.worker.engine.config import ModelLoadError
    from baton.worker.engine.engine import BatonEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    say = _progress
    say(f"loading {args.model}")
    try:
        engine = BatonEngine.from_pretrained(args.model, dtype=args.dtype, role="both",
                                             kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs)
    except (ModelLoadError, OSError) as exc:
        raise CommandError(f"--model: {exc}") from None
    try:
        profile = measure(engine, max_prompt=args.max_prompt, repeats=args.repeats, say=say)
    finally:
        engine.core.shutdown()
    from baton.profile import ProfileSet

    name = args.name or Path(args.model).resolve().name
    ps = ProfileSet(
        models={name: {1: profile}}, hardware=_machine(torch.get_num_threads()), engine="baton",
        source=f"baton profile on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ({args.dtype}, {args.repeats} runs a "
               "point, median)",
        # a `both` worker chunks its prompts by default (the planner's colocated model follows this)
        extra={"kv_bytes_per_token": {name: _kv_bytes_per_token(engine)}, "chunked_prefill": True})
    try:
        ps.save(out)
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
    a, b, c = profile.prefill
    da, db, dc = profile.decode_small
    print(f"wrote {out}: model {name}, {ps.hardware}")
    print(f"  prefill ms = {a:.3f} + {b:.5f} x tokens + {c:.3g} x tokens^2   (512 tokens: "
          f"{profile.prefill_s([512]) * 1000:.1f} ms)")
    print(f"  decode  ms = {da:.3f} + {db:.6f} x context + {dc:.4f} x batch   (batch 8 at 256: "
          f"{profile.decode_step_s(8, 8 * 256) * 1000:.1f} ms)")
    print(f"  KV capacity {profile.kv_capacity_tokens} tokens, prefill budget {profile.max_batch_tokens} tokens")
    return 0


def measure(engine, *, max_prompt: int, repeats: int, say=lambda _m: None):
    """Time prefill batches and decode steps of `engine` and fit a `WorkerProfile` (tensor parallel 1)."""
    import torch
    from baton.worker.engine.batch import build_decode, build_prefill

    from baton.profile import WorkerProfile, fit_decode, fit_prefill

    core = engine.core
    cache, model = core.cache, core.model
    bs = cache.block_size
    alloc = cache.allocator
    vocab = model.cfg.vocab_size
    max_prompt = min(max_prompt, engine.max_model_len - 1)

    def blocks(n_tokens: int) -> list[int]:
        return alloc.allocate(-(-n_tokens // bs))

    def timed(fn) -> float:
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(runs)

    lengths = sorted({n for n in (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048) if n <= max_prompt}
                     | {max_prompt})
    prefill: list[tuple[list[int], float]] = []
    with torch.inference_mode():
        for n in lengths:
            for count in (1, 2, 4):
                if n * count > engine.max_num_batched_tokens or not alloc.can_allocate(count * -(-n // bs)):
                    continue
                tables = [blocks(n) for _ in range(count)]
                toks = [[(i * 7919 + j) % vocab for j in range(n)] for i in range(count)]
                fb = build_prefill(toks, tables, bs)
                ms = timed(lambda fb=fb: model.forward(fb, cache.layers))
                prefill.append(([n] * count, ms))
                say(f"prefill {count} x {n} tokens: {ms:.1f} ms")
                for t in tables:
                    alloc.free(t)
        decode: list[tuple[int, int, float]] = []
        batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= engine.max_num_seqs})
        contexts = sorted({c for c in (32, 128, 256, 512, 1024) if c < engine.max_model_len})
        for b in batch_sizes:
            for ctx in contexts:
                if not alloc.can_allocate(b * -(-(ctx + 1) // bs)):
                    continue
                tables = [blocks(ctx + 1) for _ in range(b)]
                fb = build_decode([1] * b, [ctx + 1] * b, tables, bs, model.dtype)
                ms = timed(lambda fb=fb: model.forward(fb, cache.layers))
                decode.append((b, b * (ctx + 1), ms))
                say(f"decode batch {b} at context {ctx}: {ms:.2f} ms/step")
                for t in tables:
                    alloc.free(t)
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError("too few points fit in this engine's KV cache to fit a profile")
    p = fit_prefill(prefill)
    d = fit_decode(decode)
    return WorkerProfile(prefill=p, decode_small=d, decode_large=d, large_bs_threshold=1 << 30,
                         kv_capacity_tokens=alloc.num_blocks * bs, tensor_parallel=1,
                         max_batch_tokens=engine.max_num_batched_tokens)


def _kv_bytes_per_token(engine) -> int:
    from baton.worker.engine.kv_cache import PagedKVCache

    cfg, core = engine.model.cfg, engine.core
    per_block = PagedKVCache.bytes_per_block(cfg.num_layers, core.cache.block_size, cfg.num_kv_heads, cfg.head_dim,
                                             engine.model.dtype)
    return per_block // core.cache.block_size


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {threads} torch thread(s) of {os.cpu_count()} cores"


def _progress(msg: str) -> None:
    print(f"baton profile: {msg}", file=sys.stderr, flush=True)
