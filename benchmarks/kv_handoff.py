"""The prefill -> decode hand-off with and without layer-wise KV export, on the Baton engine over TCP.

    python benchmarks/kv_handoff.py                       # ~100M model, 512-token prompts, 7 repeats
    python benchmarks/kv_handoff.py --size tiny --prompt 256 --repeats 15

Measured: time from submitting the prefill hop to the decode worker holding all of the prompt's KV, and to the
decode worker's first token.

- after prefill (the protocol vLLM's disaggregation uses): the prefill hop runs its whole forward, returns
  `kv_transfer_params` with the first token, and only then does the decode hop start pulling.
- layer-wise: the prefill hop announces its lease when the step that ends the prompt starts
  (`baton.launch.KV_ANNOUNCE`); the decode hop starts pulling at once, the transport ships layer i as soon as
  the forward has written it, and the decode worker computes the prompt's last position itself for the first
  token.

Both engines live in this process (1 torch thread each, the TCP transport over loopback), and the two modes
alternate, so machine load hits both alike. Medians over the repeats. The `tail` column isolates the hand-off
from the forward's own (noisy) time: how long after the prefill finished the decode worker still waited for KV.
The best layer-wise export can do is hide all but the last layer's transfer behind the forward.
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


async def _one(pre, dec, ids: list[int], rid: str, layerwise: bool, kv_done: dict) -> dict:
    from baton.worker.engine.types import GenerationRequest, SamplingParams

    from baton.launch import KV_ANNOUNCE

    greedy = {"temperature": 0.0, "ignore_eos": True}
    params = {"do_remote_decode": True, **({KV_ANNOUNCE: True} if layerwise else {})}
    t0 = time.monotonic()
    stream = pre.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=1, **greedy),
                                            kv_transfer_params=params))
    first = await stream.__anext__()  # after prefill: the only output; layer-wise: the announcement
    kv = first.kv_transfer_params
    assert first.finished != layerwise, "unexpected prefill hop outputs"

    async def drain() -> float:
        async for _ in stream:
            pass
        return time.monotonic()

    prefill_end = asyncio.create_task(drain()) if layerwise else None
    t_prefill_done = time.monotonic() if prefill_end is None else None
    kv_done.clear()
    t_first = None
    async for out in dec.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=2, **greedy),
                                                    kv_transfer_params=kv)):
        if t_first is None and out.token_ids:
            t_first = time.monotonic()
    if prefill_end is not None:
        t_prefill_done = await prefill_end
    return {"prefill": t_prefill_done - t0, "kv": kv_done["at"] - t0, "first": t_first - t0,
            "transfer": kv_done["seconds"], "tail": kv_done["at"] - t_prefill_done}


async def _run(path: Path, prompt_len: int, repeats: int, seed: int) -> dict[str, list[dict]]:
    from baton.worker.engine.engine import BatonEngine
    from baton.worker.kv.tcp import TCPKVTransport

    kv_done: dict = {}

    def on_kv(seconds: float, nbytes: int) -> None:
        kv_done.update(at=time.monotonic(), seconds=seconds, bytes=nbytes)

    def transport() -> TCPKVTransport:
        return TCPKVTransport("127.0.0.1", 0, bind_host="127.0.0.1", secret="bench")

    pre = BatonEngine.from_pretrained(path, role="prefill", kv_transport=transport(), max_model_len=prompt_len + 8,
                                      enable_prefix_caching=False)
    dec = BatonEngine.from_pretrained(path, role="decode", kv_transport=transport(), max_model_len=prompt_len + 8,
                                      enable_prefix_caching=False, on_kv_transfer=on_kv)
    rng = random.Random(seed)
    vocab = pre.model.cfg.vocab_size
    out: dict[str, list[dict]] = {"after prefill": [], "layer-wise": []}
    async with pre, dec:
        for i in range(repeats + 1):  # the first round warms up
            for name in (out if i % 2 == 0 else list(reversed(out))):
                ids = [rng.randrange(3, vocab) for _ in range(prompt_len)]
                r = await _one(pre, dec, ids, f"{name}-{i}", name == "layer-wise", kv_done)
                if i:
                    out[name].append(r)
                    print(f"  {name:<13} kv held {1000 * r['kv']:7.1f} ms, first token {1000 * r['first']:7.1f} ms",
                          file=sys.stderr, flush=True)
        kv_bytes = kv_done["bytes"]
    out["bytes"] = kv_bytes  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "100m", "smollm2"), default="100m")
    ap.add_argument("--model-dir", default=None, help="existing model directory (default: create one)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (512)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from baton.worker.tiny import ensure_benchmark_model, ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="baton-handoff-") as tmp:  # the model goes here without --model-dir
        path = (ensure_tiny_model(args.model_dir, args.size) if args.model_dir
                else ensure_benchmark_model(args.size, tmp))
        res = asyncio.run(_run(path, args.prompt, args.repeats, args.seed))
    nbytes = res.pop("bytes")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in res.items()}
    print(f"\nKV hand-off, {path.name} model, {args.prompt}-token prompts ({nbytes / 2**20:.1f} MiB of KV), TCP over "
          f"loopback, median of {args.repeats}")
    header = (f"{'mode':<14} {'prefill done':>13} {'KV held by decode':>18} {'decode 1st token':>17} "
              f"{'transfer itself':>16} {'tail after prefill':>19}")
    print(header)
    print("-" * len(header))
    for name, m in med.items():
        print(f"{name:<14} {1000 * m['prefill']:>10.1f} ms {1000 * m['kv']:>15.1f} ms {1000 * m['first']:>14.1f} ms "
              f"{1000 * m['transfer']:>13.1f} ms {1000 * m['tail']:>16.1f} ms")
    a, b = med["after prefill"], med["layer-wise"]
    print(f"hand-off tail (decode holds all KV minus prefill done; the part of the transfer not hidden behind the "
          f"forward): after prefill {1000 * a['tail']:.1f} ms, layer-wise {1000 * b['tail']:.1f} ms")
    print(f"end to end: KV held {a['kv'] / b['kv']:.2f}x earlier, decode's first token {a['first'] / b['first']:.2f}x "
          "(after prefill / layer-wise; the forward itself dominates and varies with machine load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
