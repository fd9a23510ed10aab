"""Router overhead: latency added per request by `baton router`, and the most requests/s one router process
carries.

    OMP_NUM_THREADS=1 python benchmarks/router.py [--requests 2000] [--seconds 5] [--concurrency 32]

To isolate the router, the workers are a trivial stub HTTP server (aiohttp, fixed JSON answers; a prefill
request gets `kv_transfer_params` back) in its own process, and every arm is measured the same way: one
keep-alive connection (http.client), requests one at a time, arms alternating request by request so noise from
other processes on the machine hits all arms alike. Arms:

- direct:              client -> stub                        (one hop)
- router (both):       client -> baton router --both -> stub (one hop through the router)
- direct 2 hops:       client -> stub prefill, then -> stub decode (what the router does, by hand)
- router (disagg):     client -> baton router --prefill --decode -> stubs
- fastapi+httpx proxy: the same one-hop proxy written with FastAPI/uvicorn + a pooled httpx.AsyncClient
                       (the alternative to aiohttp we did not pick), for comparison

Added latency = percentile(router arm) - percentile(its direct arm). Throughput: an aiohttp client with
`--concurrency` connections for `--seconds` against the router (both) and against the stub directly (all
three processes share the machine's cores, so this is a floor for a router with a core of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import time

from baton.worker.local_fleet import free_port

from baton.workload import percentile  # the one percentile definition

COMPLETION = {
    "id": "cmpl-x", "object": "text_completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "text": "!", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
BODY = json.dumps({"model": "stub", "prompt": "Hello, my name is", "max_tokens": 1, "temperature": 0}).encode()


# ------------------------------------------------------------------------------------------- servers


def serve_stub(port: int) -> None:
    from aiohttp import web

    plain = json.dumps({**COMPLETION, "kv_transfer_params": None}).encode()
    prefill = json.dumps({**COMPLETION, "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "stub", "remote_block_ids": [0]}}).encode()

    async def completions(request: web.Request) -> web.Response:
        body = await request.read()
        kv = b'"do_remote_decode":true' in body
        return web.Response(body=prefill if kv else plain, content_type="application/json",
                            headers={"X-Request-Id": request.headers.get("X-Request-Id", "x")})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_fastapi_proxy(port: int, upstream: str) -> None:
    import httpx
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    state = {}

    @app.on_event("startup")
    async def startup() -> None:
        state["client"] = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_keepalive_connections=100))

    async def completions(request):  # a plain Starlette route (no dependency injection)
        body = json.loads(await request.body())
        r = await state["client"].post("/v1/completions", content=json.dumps(body),
                                       headers={"Content-Type": "application/json"})
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    app.add_route("/v1/completions", completions, methods=["POST"])

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"port {port} never became ready")


# ------------------------------------------------------------------------------------------- clients


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.headers = {"Content-Type": "application/json"}

    def post(self, body: bytes = BODY) -> None:
        self.conn.request("POST", "/v1/completions", body=body, headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:200]!r}")


async def throughput(port: int, seconds: float, concurrency: int) -> float:
    import aiohttp

    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with session.post(f"http://127.0.0.1:{port}/v1/completions", data=BODY,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per arm (default 3000)")
    ap.add_argument("--block", type=int, default=1, help="requests per interleaved block (default 1: arms alternate request by request)")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput run length (default 5)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-fastapi", action="store_true", help="skip the FastAPI+httpx comparison arm")
    ap.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-fastapi", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub)
        return 0
    if args.serve_fastapi:
        serve_fastapi_proxy(int(args.serve_fastapi[0]), args.serve_fastapi[1])
        return 0

    py = sys.executable
    baton = [py, "-c", "import sys; from baton.cli import main; sys.exit(main())"]
    procs: list[subprocess.Popen] = []
    try:
        ports = {name: free_port() for name in ("stub", "stub2", "router_both", "router_disagg", "fastapi")}
        for name in ("stub", "stub2"):
            procs.append(spawn([py, __file__, "--serve-stub", str(ports[name])]))
            wait_ready(ports[name], procs[-1])
        stub, stub2 = f"http://127.0.0.1:{ports['stub']}", f"http://127.0.0.1:{ports['stub2']}"
        procs.append(spawn(baton + ["router", "--host", "127.0.0.1", "--port", str(ports["router_both"]),
                                    "--both", stub, "--log-level", "warning"]))
        wait_ready(ports["router_both"], procs[-1])
        procs.append(spawn(baton + ["router", "--host", "127.0.0.1", "--port", str(ports["router_disagg"]),
                                    "--prefill", stub, "--decode", stub2, "--log-level", "warning"]))
        wait_ready(ports["router_disagg"], procs[-1])
        if not args.no_fastapi:
            procs.append(spawn([py, __file__, "--serve-fastapi", str(ports["fastapi"]), stub]))
            wait_ready(ports["fastapi"], procs[-1])

        prefill_body = json.dumps({**json.loads(BODY), "kv_transfer_params": {"do_remote_decode": True}}).encode()
        c_stub, c_stub2 = Client(ports["stub"]), Client(ports["stub2"])

        def two_hops() -> None:
            c_stub.post(prefill_body)
            c_stub2.post(BODY)

        arms = {
            "direct": c_stub.post,
            "router (both)": Client(ports["router_both"]).post,
            "direct 2 hops": two_hops,
            "router (disagg)": Client(ports["router_disagg"]).post,
        }
        if not args.no_fastapi:
            arms["fastapi+httpx proxy"] = Client(ports["fastapi"]).post
        for fn in arms.values():  # warm-up: connections, code paths
            for _ in range(200):
                fn()
        lat: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(max(1, args.requests // args.block)):
            for name, fn in arms.items():
                xs = lat[name]
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    fn()
                    xs.append(time.perf_counter() - t0)

        rps_router = asyncio.run(throughput(ports["router_both"], args.seconds, args.concurrency))
        rps_direct = asyncio.run(throughput(ports["stub"], args.seconds, args.concurrency))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    ms = 1000.0
    base = {"router (both)": "direct", "router (disagg)": "direct 2 hops", "fastapi+httpx proxy": "direct"}
    print(f"\nrouter overhead ({len(lat['direct'])} requests per arm, one at a time, "
          f"{os.cpu_count()} cores shared by client, router and stub)\n")
    print(f"{'arm':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'added p50':>11}{'added p99':>11}")
    for name, xs in lat.items():
        p50, p99, mean = percentile(xs, 50) * ms, percentile(xs, 99) * ms, statistics.fmean(xs) * ms
        if name in base:
            b = lat[base[name]]
            add50 = f"{p50 - percentile(b, 50) * ms:>11.3f}"
            add99 = f"{p99 - percentile(b, 99) * ms:>11.3f}"
        else:
            add50 = add99 = f"{'-':>11}"
        print(f"{name:<22}{p50:>9.3f}{p99:>9.3f}{mean:>9.3f}{add50}{add99}")
    print(f"\nthroughput (concurrency {args.concurrency}, {args.seconds:.0f} s): "
          f"router (both) {rps_router:,.0f} req/s; stub direct {rps_direct:,.0f} req/s")
    added99 = (percentile(lat["router (both)"], 99) - percentile(lat["direct"], 99)) * ms
    print(f"goal p99 overhead < 2 ms: {'met' if added99 < 2 else 'NOT met'} ({added99:.3f} ms, one hop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
