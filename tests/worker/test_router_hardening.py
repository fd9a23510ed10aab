"""Router hardening: the health path per engine (`--health-path`), client-supplied KV transfer parameters
never reaching a worker, unguessable KV lease ids, and readiness (and serving) with no healthy prefill worker.

Stub workers (aiohttp, in threads) record every body the router sends them, so the tests see exactly what a
worker would get; the lease-id test runs a real prefill worker on the tiny model. The router helpers
(`RunningRouter`, `settled`, ...) come from test_router.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time

import httpx
import pytest

pytest.importorskip("torch")

from .test_router import (
    NOT_A_HANG,
    SSE_EVENT,
    RunningRouter,
    RunningServer,
    Stub,
    dead_url,
    free_port,
    hop_errors,
    make_engine,
    outcome,
    settled,
)

SERVED = "tiny"
PATHS = ("/v1/completions", "/v1/chat/completions")
#: What a hostile client puts in its body: a decode worker told to pull "KV" from an address it chose.
EVIL = {"do_remote_prefill": True, "remote_host": "evil.example", "remote_port": 6666,
        "remote_engine_id": "someone-else", "remote_request_id": "another-request", "remote_block_ids": [0]}
#: The parameters the router's own prefill hop gets back from the (stub) prefill worker.
ROUTER_KV = {"do_remote_prefill": True, "remote_host": "10.0.0.7", "remote_port": 7000,
             "remote_engine_id": "p0", "remote_request_id": "lease-from-prefill", "remote_block_ids": [1, 2]}


# ---------------------------------------------------------------------------------------------- helpers


class Worker(Stub):
    """A stub worker (test_router.Stub) that records each POSTed JSON body and answers with
    `handler(request, body, n)`; its health path and status are Stub's."""

    def __init__(self, handler, **health) -> None:
        self.bodies: list[dict] = []

        async def recording(request):
            body = await request.json()
            self.bodies.append(body)
            return await handler(request, body, len(self.bodies))

        super().__init__(recording, **health)


async def answer(request, body: dict, n: int):
    """A decode (or both) worker's answer: JSON, or one SSE event and [DONE]."""
    from aiohttp import web

    if not body.get("stream"):
        return web.json_response({"id": "g", "object": "text_completion",
                                  "choices": [{"index": 0, "text": "good", "finish_reason": "length"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(SSE_EVENT + b"data: [DONE]\n\n")
    return resp


async def prefill_ok(request, body: dict, n: int):
    from aiohttp import web

    return web.json_response({"id": "p", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                              "kv_transfer_params": ROUTER_KV})


async def prefill_500(request, body: dict, n: int):
    from aiohttp import web

    return web.json_response({"error": {"message": "boom", "code": "engine_error"}}, status=500)


async def kv_lost_then_answer(request, body: dict, n: int):
    """Odd attempts fail the KV pull (as a decode worker whose prefill worker lost the lease), even ones
    (the router's resend without params) answer."""
    from aiohttp import web

    if n % 2:
        return web.json_response({"error": {"message": "lost", "code": "kv_transfer_failed"}}, status=502)
    return await answer(request, body, n)


async def vllm_kv_lost_then_answer(request, body: dict, n: int):
    """vLLM's decode worker under `kv_load_failure_policy: fail` (its default) when the KV pull fails (the
    prefill worker died after its hop): a plain 500. The router's resend without params answers."""
    from aiohttp import web

    if n % 2:
        return web.json_response({"error": {"message": "Internal server error", "type": "InternalServerError",
                                            "param": None, "code": 500}}, status=500)
    return await answer(request, body, n)


def hostile_body(path: str, stream: bool) -> dict:
    """A request steering the KV hand-off both ways vLLM accepts: top-level and in `vllm_xargs`."""
    body = {"model": SERVED, "max_tokens": 4, "stream": stream, "kv_transfer_params": EVIL,
            "vllm_xargs": {"kv_transfer_params": EVIL, "keep": 1}}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


def wait_ready(r: RunningRouter, timeout: float = 5.0) -> httpx.Response:
    """The router's /ready once it answers 200, or its last answer after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(r.base_url + "/ready", timeout=5)
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ 1. health path


def test_health_path_flag_default_and_validation():
    from baton.worker.router.app import RouterConfig
    from baton.worker.router.cli import build_config
    from baton.worker.router.pool import DEFAULT_HEALTH_PATH, HealthChecker

    from baton.cli import CommandError, build_parser

    default = build_parser().parse_args(["router", "--both", "http://w:8000"])
    assert default.health_path == DEFAULT_HEALTH_PATH == "/ready"
    assert build_config(default).health_path == DEFAULT_HEALTH_PATH == RouterConfig().health_path
    assert inspect.signature(HealthChecker).parameters["path"].default == DEFAULT_HEALTH_PATH
    vllm = build_parser().parse_args(["router", "--both", "http://w:8000", "--health-path", "/health"])
    assert build_config(vllm).health_path == "/health"
    for bad, why in (("health", "must start with '/'"), ("", "must start with '/'"),
                     ("/he alth", "must not contain spaces")):
        args = build_parser().parse_args(["router", "--both", "http://w:8000", "--health-path", bad])
        with pytest.raises(CommandError) as err:
            build_config(args)
        message = str(err.value)
        assert message.startswith("--health-path ") and why in message and "\n" not in message, message


@contextlib.asynccontextmanager
async def serving(path: str, handler):
    """An in-process aiohttp worker answering GET `path` with `handler`; yields its base URL, stopped on exit."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_health_checker_gets_the_configured_path():
    """A vLLM-like worker (only /health): healthy with path /health, unhealthy with the default /ready."""
    import aiohttp
    from aiohttp import web
    from baton.worker.router.pool import HealthChecker, Pool

    async def health(request):
        return web.Response(text="")

    async def go() -> None:
        async with serving("/health", health) as url, aiohttp.ClientSession() as session:
            pool = Pool()
            pool.set_urls("decode", [url])
            (ep,) = pool.all()
            await HealthChecker(pool, session, path="/health").check_all()
            assert ep.healthy, ep.last_error
            await HealthChecker(pool, session).check_all()
            assert not ep.healthy and ep.last_error == "/ready answered 404"

    asyncio.run(go())


def test_a_busy_worker_that_misses_checks_keeps_its_traffic_until_the_threshold():
    """The router judges health with the kubelet's readiness numbers (launch.WORKER_READINESS): a check that
    gets no answer in time is a missed check, and only `failure_threshold` in a row take a worker out -- a busy
    prefill worker on a loaded node that misses one check must not be declared dead (every request would
    then fail or be recomputed). A 503 ("not ready": draining) or a refused connection drops it at once;
    `success_threshold` passing checks bring it back."""
    import aiohttp
    from aiohttp import web
    from baton.worker.router.pool import HealthChecker, Pool

    from baton import launch

    state = {"delay": 0.0, "status": 200}

    async def ready(request):
        await asyncio.sleep(state["delay"])
        return web.Response(status=state["status"], text="")

    async def go() -> None:
        threshold = launch.WORKER_READINESS.failure_threshold
        assert threshold >= 2 and launch.WORKER_READINESS.timeout_seconds >= 5  # a kubelet's patience
        async with serving("/ready", ready) as url, aiohttp.ClientSession() as session:
            pool = Pool()
            pool.set_urls("prefill", [url])
            (ep,) = pool.all()
            checker = HealthChecker(pool, session, timeout=0.2, load_metrics=False)
            await checker.check_all()
            assert ep.healthy
            state["delay"] = 0.5  # busy: the answer comes after the check's timeout
            for missed in range(1, threshold):
                await checker.check_all()
                assert ep.healthy and ep.missed == missed, (missed, ep.last_error)
                assert pool.healthy("prefill") == [ep]  # still takes traffic
            await checker.check_all()
            assert not ep.healthy and f"{threshold} checks in a row" in ep.last_error
            state["delay"] = 0.0
            await checker.check_all()
            assert ep.healthy and ep.missed == 0  # one passing check: back (success_threshold 1)
            state["status"] = 503  # draining: the worker says so, believed at once
            await checker.check_all()
            assert not ep.healthy and ep.last_error == "/ready answered 503"
            state["status"] = 200
            await checker.check_all()
            assert ep.healthy
        async with aiohttp.ClientSession() as session:  # nothing listens any more: refused, dropped at once
            await HealthChecker(pool, session, timeout=0.2, load_metrics=False).check_all()
            assert not ep.healthy and ep.missed == 0, ep.last_error

    asyncio.run(go())


def test_router_with_health_path_is_ready_on_a_vllm_fleet():
    workers = [Worker(prefill_ok, health_path="/health").start(), Worker(answer, health_path="/health").start()]
    vllm = RunningRouter(prefill=[workers[0].base_url], decode=[workers[1].base_url],
                         health_path="/health").start(ready=False)
    wrong = RunningRouter(prefill=[workers[0].base_url], decode=[workers[1].base_url]).start(ready=False)
    try:
        assert wait_ready(vllm).status_code == 200
        assert wait_ready(wrong, timeout=1.0).status_code == 503  # the default path is a 404 on vLLM
        assert all(ep.last_error == "/ready answered 404" for ep in wrong.router.pool.all())
    finally:
        vllm.stop()
        wrong.stop()
        for w in workers:
            w.stop()


# ------------------------------------------------------------------- 2. client KV params never reach a worker

SCENARIOS = ("disaggregated", "prefill_5xx", "kv_lost", "vllm_kv_lost", "both", "decode_only")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_client_kv_transfer_params_never_reach_a_worker(scenario):
    """On every path (each hop, JSON and SSE, completions and chat) the client's `kv_transfer_params`, top-level
    and in `vllm_xargs`, are dropped; the decode hop carries only what the router's prefill hop returned."""
    decode_handler = {"kv_lost": kv_lost_then_answer, "vllm_kv_lost": vllm_kv_lost_then_answer}.get(scenario, answer)
    prefill = Worker(prefill_500 if scenario == "prefill_5xx" else prefill_ok).start()
    last = Worker(decode_handler).start()
    role = "both" if scenario == "both" else "decode"
    config = {role: [last.base_url]}
    if scenario in ("disaggregated", "prefill_5xx", "kv_lost", "vllm_kv_lost"):
        config["prefill"] = [prefill.base_url]
    r = RunningRouter(**config).start()
    try:
        for path in PATHS:
            for stream in (False, True):
                resp = httpx.post(r.base_url + path, json=hostile_body(path, stream), timeout=30)
                assert resp.status_code == 200, resp.text
        hops = last.bodies
        assert len(hops) == (8 if scenario in ("kv_lost", "vllm_kv_lost") else 4)
        for body in prefill.bodies:  # the prefill hop: the router's own request for KV, nothing else
            assert body["kv_transfer_params"] == {"do_remote_decode": True}
            assert body["vllm_xargs"] == {"keep": 1}
        for i, body in enumerate(hops):
            if scenario == "disaggregated" or (scenario in ("kv_lost", "vllm_kv_lost") and i % 2 == 0):
                assert body["kv_transfer_params"] == ROUTER_KV  # exactly what the prefill hop returned
            else:  # recompute or colocated: no params at all
                assert "kv_transfer_params" not in body, body
            assert body["vllm_xargs"] == {"keep": 1}, body  # the rest of vllm_xargs still goes through
        assert len(prefill.bodies) == (4 if "prefill" in config else 0)
        m = settled(r)
        expected = "ok" if scenario in ("disaggregated", "both") else "fallback_recompute"
        assert outcome(m, expected) == 4
    finally:
        r.stop()
        prefill.stop()
        last.stop()


def test_strip_kv_params_leaves_clean_bodies_alone():
    from baton.worker.router.app import strip_kv_params

    assert strip_kv_params({"prompt": "x", "vllm_xargs": {"a": 1}}) is None  # forwarded byte for byte
    assert strip_kv_params({"prompt": "x", "vllm_xargs": "not a dict"}) is None  # the worker's to refuse
    body = {"prompt": "x", "kv_transfer_params": EVIL, "vllm_xargs": {"kv_transfer_params": EVIL}}
    assert strip_kv_params(body) == {"prompt": "x", "vllm_xargs": {}}
    assert body["kv_transfer_params"] == EVIL  # the caller's dict is not modified


# --------------------------------------------------------------------------------- 3. unguessable lease ids


@pytest.fixture(scope="module")
def prefill_worker(tmp_path_factory):
    from baton.worker.server import create_app
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path_factory.mktemp("tiny-lease"), size="tiny", arch="llama", seed=0)
    engine = make_engine(model, role="prefill", kv_lease_seconds=2)
    srv = RunningServer(create_app(engine, served_model_name=SERVED), engine)
    srv.start()
    yield srv
    srv.stop()


def test_lease_ids_are_random_and_not_derived_from_the_request_id(prefill_worker):
    header = "client-chosen-id"
    body = {"model": SERVED, "prompt": "Where do you live?", "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}
    leases = []
    for _ in range(2):  # one after the other: the same id may not be in flight twice on a worker
        resp = httpx.post(prefill_worker.base_url + "/v1/completions", json=body, timeout=60,
                          headers={"X-Request-Id": header})
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == f"cmpl-{header}"  # the client's id still names the request
        leases.append(resp.json()["kv_transfer_params"]["remote_request_id"])
    assert leases[0] != leases[1]
    for lease in leases:
        assert header not in lease and "#" not in lease, lease
        assert len(lease) >= 22, lease  # token_urlsafe(16): 128 random bits


def test_new_lease_id_comes_from_secrets(monkeypatch):
    import secrets

    from baton.worker.engine import core

    ids = {core.new_lease_id() for _ in range(1000)}
    assert len(ids) == 1000
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: f"from-secrets-{n}")
    assert core.new_lease_id() == "from-secrets-16"


# ------------------------------------------------------------------------ 4. ready without a prefill worker


def test_pool_ready_needs_a_decode_or_both_worker_only():
    from baton.worker.router.pool import Pool

    def pool(**healthy: list[bool]) -> Pool:
        p = Pool()
        for role, states in healthy.items():
            p.set_urls(role, [f"http://{role}{i}:8000" for i in range(len(states))])
            for ep, ok in zip(p.endpoints[role].values(), states):
                ep.healthy = ok
        return p

    assert pool(prefill=[True], decode=[True]).ready()[0]
    assert pool(prefill=[False], decode=[True]).ready()[0]  # recompute on decode
    assert pool(decode=[True]).ready()[0]  # no prefill endpoint at all
    assert pool(prefill=[False], both=[True]).ready()[0]
    ok, why = pool(prefill=[True], decode=[False]).ready()
    assert not ok and "need a healthy decode or both worker" in why and "prefill: 1/1 healthy" in why
    assert not pool().ready()[0]


def test_ready_reports_which_workers_the_router_has_seen():
    """A starting fleet waits for every worker to be healthy in the router's eyes (`all_workers_seen`), not
    only for /ready's 200: before its first check of a prefill worker the router recomputes on decode."""
    from baton.worker.router.pool import Pool, all_workers_seen

    p = Pool()
    p.set_urls("prefill", ["http://p0:8000", "http://p1:8000"])
    p.set_urls("decode", ["http://d0:8000"])
    p.endpoints["decode"]["http://d0:8000"].mark(True)
    body = {"status": "ready", "workers": p.counts()}
    assert p.ready()[0]  # one healthy decode worker: Ready ...
    assert body["workers"]["prefill"] == {"total": 2, "checked": 0, "healthy": 0}
    assert not all_workers_seen(body) and not all_workers_seen(body, healthy=False)  # ... but not all seen
    p1 = p.endpoints["prefill"]["http://p1:8000"]
    p.endpoints["prefill"]["http://p0:8000"].mark(True)
    p1.mark(False, "connection refused")
    body = {"status": "ready", "workers": p.counts()}
    assert all_workers_seen(body, healthy=False) and not all_workers_seen(body)  # all checked, one dead
    p1.mark(True)
    assert all_workers_seen({"status": "ready", "workers": p.counts()})
    assert not all_workers_seen({"status": "ready"}) and not all_workers_seen(None)  # not a router's body


@pytest.mark.parametrize("prefill", ["unhealthy", "dead", "none"])
def test_ready_and_serving_by_recompute_without_a_healthy_prefill_worker(prefill):
    sick = Worker(prefill_ok, health_status=503).start()  # up, but its health check fails
    decode = Worker(answer).start()
    urls = {"unhealthy": [sick.base_url], "dead": [dead_url()], "none": []}[prefill]
    r = RunningRouter(prefill=urls, decode=[decode.base_url]).start(ready=False)
    try:
        ready = wait_ready(r)
        assert ready.status_code == 200, ready.text
        for stream in (False, True):
            resp = httpx.post(r.base_url + "/v1/completions", timeout=30,
                              json={"model": SERVED, "prompt": "x", "stream": stream})
            assert resp.status_code == 200, resp.text
            assert "good" in resp.text if not stream else resp.text.endswith("data: [DONE]\n\n")
        assert sick.bodies == []  # straight to decode: no prefill hop was tried
        assert [("kv_transfer_params" in b) for b in decode.bodies] == [False, False]
        m = settled(r)
        assert outcome(m, "fallback_recompute") == 2 and outcome(m, "error") == 0
        assert hop_errors(m, "prefill", "connection") == 0 and hop_errors(m, "decode", "connection") == 0
        assert not any(name == "baton_router_hop_errors_total" and v for (name, _), v in m.items())
    finally:
        r.stop()
        sick.stop()
        decode.stop()


# --------------------------------------------------------------------------------- 5. waiting for a worker


def test_a_request_waits_for_a_decode_worker_instead_of_failing():
    """A sole decode pod being replaced: the request is held (bounded by worker_wait) until a decode worker
    is healthy again, instead of a 503; with none coming, 503 + Retry-After after worker_wait, never a hang."""
    decode = Worker(answer, health_status=503).start()  # up, not healthy yet (a replacement loading)
    # worker_wait far above the 1.5 s the worker takes to heal: the health checks that see it heal (every 0.5 s,
    # 5 s timeout) can be slow on a loaded machine; the bound tells "waited for the worker" from "503 at once"
    r = RunningRouter(decode=[decode.base_url], worker_wait=60.0).start(ready=False)
    try:
        def heal() -> None:
            time.sleep(1.5)
            decode.health_status = 200

        threading.Thread(target=heal, daemon=True).start()
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", timeout=90, json={"model": SERVED, "prompt": "x"})
        waited = time.monotonic() - t0
        assert resp.status_code == 200 and "good" in resp.text, resp.text
        assert 1.0 < waited < 60.0, waited
    finally:
        r.stop()
        decode.stop()
    never = Worker(answer, health_status=503).start()
    r = RunningRouter(decode=[never.base_url], worker_wait=0.5).start(ready=False)
    try:
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", timeout=30, json={"model": SERVED, "prompt": "x"})
        assert resp.status_code == 503 and resp.headers.get("Retry-After"), resp.text
        assert 0.4 < time.monotonic() - t0 < NOT_A_HANG
        assert never.bodies == []
    finally:
        r.stop()
        never.stop()


def test_the_decode_worker_leaving_during_the_prefill_hop_is_waited_for_too():
    """The race the real-node test hit: decode was healthy on entry, went away while the prefill hop ran
    (its pod deleted), and the last hop found none -- 503 at once. It waits like the entry does."""
    decode = Worker(answer).start()

    async def prefill_while_decode_leaves(request, body: dict, n: int):
        decode.health_status = 503  # the decode pod starts draining now ...

        def back() -> None:
            time.sleep(2.0)
            decode.health_status = 200  # ... and its replacement is healthy 2 s later

        threading.Thread(target=back, daemon=True).start()
        await asyncio.sleep(1.5)  # long enough for the router's health check to see it
        return await prefill_ok(request, body, n)

    prefill = Worker(prefill_while_decode_leaves).start()
    r = RunningRouter(prefill=[prefill.base_url], decode=[decode.base_url], worker_wait=10.0).start(ready=False)
    try:
        assert wait_ready(r).status_code == 200
        resp = httpx.post(r.base_url + "/v1/completions", timeout=30, json={"model": SERVED, "prompt": "x"})
        assert resp.status_code == 200 and "good" in resp.text, resp.text
    finally:
        r.stop()
        prefill.stop()
        decode.stop()
