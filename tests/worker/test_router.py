"""`baton router` end to end with REAL workers on the tiny model: the official `openai` client through the
router gets exactly what a colocated worker answers (greedy), streaming or not, completions and chat; the
fallbacks (dead prefill -> recompute, lost KV -> recompute, overloaded -> 503), a decode worker killed
mid-stream (clean error event, no hang), client cancellation reaching the workers, metrics; and, with stub
workers that accept a connection and never answer (or stall mid-stream), the hop and stream-idle timeouts.

Prefill and decode workers run in this process (uvicorn threads sharing the in-process KV registry); the
worker killed mid-stream is a real `baton worker` process; the router runs its aiohttp app in a thread with
its own loop (as `baton router` does), and one test runs the real `baton router` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import pytest
from baton.e2e.processes import wait_until_ready
from baton.worker.router.pool import all_workers_seen

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

from .test_server_openai import RunningServer, free_port, make_engine, serve_roles, wait_idle

SERVED = "tiny"
#: The upper bound of a test that a timeout fired instead of a hang: far above any hop timeout a test sets (0.5 s),
#: far below the client's own timeout (CLIENT_TIMEOUT). A bound that tells a hang from a timeout, not a speed: on
#: a loaded 2-core CI machine a 0.5 s hop timeout has been answered after 23 s.
NOT_A_HANG = 40.0
CLIENT_TIMEOUT = 90.0


# ---------------------------------------------------------------------------------------------- helpers


class RunningRouter:
    """The router's aiohttp app on a free loopback port, in a thread with its own event loop."""

    def __init__(self, **config) -> None:
        from baton.worker.router.app import RouterConfig

        config.setdefault("health_interval", 0.5)
        config.setdefault("worker_wait", 0.0)  # tests of other behaviour: no worker means 503 at once
        self.config = RouterConfig(**config)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"router-{self.port}")
        self._stop: asyncio.Event | None = None
        self.router = None

    def _run(self) -> None:
        from aiohttp import web
        from baton.worker.router.app import ROUTER_KEY, create_app

        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            app = create_app(self.config)
            self.router = app[ROUTER_KEY]
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self.loop.run_until_complete(main())

    def start(self, ready: bool = True) -> RunningRouter:
        self.thread.start()
        deadline = time.monotonic() + 60  # a condition with a generous deadline: CI machines are loaded
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.base_url + "/ready", timeout=5)
                # Ready, and every worker checked once (a dead one too): no request races the first checks
                if not ready or (r.status_code == 200 and all_workers_seen(r.json(), healthy=False)):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the router never became ready")

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return scrape(self.base_url)


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("llmservice", "namespace")))):
            s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def outcome(m: dict, name: str) -> float:
    return m.get(("baton_router_requests_total", (("outcome", name),)), 0.0)


def settled(front: RunningRouter, timeout: float = 5.0) -> dict:
    """The router's metrics once no request is in flight (a client can read `[DONE]` a moment before the
    router's handler finishes and counts the outcome)."""
    deadline = time.monotonic() + timeout
    while True:
        m = front.metrics()
        if all(v == 0 for (name, _), v in m.items() if name == "baton_router_inflight"):
            time.sleep(0.05)
            return front.metrics()
        assert time.monotonic() < deadline, "requests still in flight at the router"
        time.sleep(0.02)


class Stub:
    """A minimal aiohttp worker whose answers a test decides (`handler(request) -> web.Response`); GET
    `health_path` answers `health_status`, which a test may change while it runs (a worker turning healthy),
    with a JSON body holding `health_extra` too (a Baton worker's /ready), or none at all with
    `health_body=False` (vLLM's /health)."""

    def __init__(self, handler, *, health_path: str = "/ready", health_status: int = 200,
                 health_extra: dict | None = None, health_body: bool = True) -> None:
        self.handler = handler
        self.health_path = health_path
        self.health_status = health_status
        self.health_extra = health_extra or {}
        self.health_body = health_body
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def post(request):
            self.calls += 1
            return await self.handler(request)

        async def health(request):
            if not self.health_body:
                return web.Response(status=self.health_status)
            ok = self.health_status == 200
            return web.json_response({"status": "ready" if ok else "unavailable", **self.health_extra},
                                     status=self.health_status)

        async def main():
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/completions", post)
            app.router.add_post("/v1/chat/completions", post)
            app.router.add_get(self.health_path, health)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self.loop.run_until_complete(main())

    def start(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(self.base_url + self.health_path, timeout=1)  # any answer: it listens
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("stub never started")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def text_of(resp, chat: bool) -> str:
    return resp.choices[0].message.content if chat else resp.choices[0].text


def stream_text(chunks, chat: bool) -> str:
    if chat:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def ask(client, chat: bool, prompt: str, *, stream: bool, max_tokens: int = 12, **extra):
    kw = dict(model=SERVED, max_tokens=max_tokens, temperature=0, stream=stream,
              extra_body={"ignore_eos": True}, **extra)
    if chat:
        return client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
    return client.completions.create(prompt=prompt, **kw)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-router"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def workers(model):
    yield from serve_roles(model, SERVED)


@pytest.fixture(scope="module")
def router(workers):
    r = RunningRouter(prefill=[workers["prefill"].base_url], decode=[workers["decode"].base_url]).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def colocated(workers):
    r = RunningRouter(both=[workers["both"].base_url], policy="round-robin").start()
    yield r
    r.stop()


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_router_equals_a_colocated_worker(workers, router, colocated, chat, stream):
    prompt = "Where do you live, little fox?"
    direct = ask(workers["both"].client(), chat, prompt, stream=False)
    before = settled(router)
    for front in (router, colocated):
        got = ask(front.client(), chat, prompt, stream=stream)
        if stream:
            chunks = list(got)
            assert stream_text(chunks, chat) == text_of(direct, chat)
            assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
        else:
            assert text_of(got, chat) == text_of(direct, chat)
            assert got.usage == direct.usage
            assert got.choices[0].finish_reason == direct.choices[0].finish_reason
    after = settled(router)
    assert outcome(after, "ok") == outcome(before, "ok") + 1
    assert outcome(after, "fallback_recompute") == outcome(before, "fallback_recompute")
    wait_idle(workers["prefill"].engine)
    wait_idle(workers["decode"].engine)
    assert workers["prefill"].engine.stats().num_kv_leases == 0  # every KV the prefill held was pulled


def test_request_id_and_usage_chunk_pass_through(workers, router):
    with httpx.stream(
        "POST", router.base_url + "/v1/completions", timeout=60, headers={"X-Request-Id": "abc-123"},
        json={"model": SERVED, "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True,
              "ignore_eos": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":4' in lines[-2]
    assert all('"id":"cmpl-abc-123"' in line for line in lines[:-1])


def test_models_health_ready(router, colocated):
    assert [m.id for m in router.client().models.list().data] == [SERVED]
    assert [m.id for m in colocated.client().models.list().data] == [SERVED]
    assert httpx.get(router.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(router.base_url + "/ready").json()
    assert ready["status"] == "ready" and all_workers_seen(ready)  # every worker counted, checked and healthy
    assert sum(c["total"] for c in ready["workers"].values()) >= 2


def test_not_ready_and_503_without_workers():
    r = RunningRouter(prefill=[dead_url()], decode=[dead_url()]).start(ready=False)
    try:
        ready = httpx.get(r.base_url + "/ready")
        assert ready.status_code == 503 and "prefill: 0/1 healthy" in ready.json()["error"]["message"]
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "x"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["code"] == "no_workers"
        assert httpx.get(r.base_url + "/v1/models").status_code == 503
        with pytest.raises(openai.APIStatusError) as err:  # the openai client sees a clean 503
            r.client().completions.create(model=SERVED, prompt="x", max_tokens=2)
        assert err.value.status_code == 503
    finally:
        r.stop()


def test_bad_json_is_a_400(router):
    r = httpx.post(router.base_url + "/v1/completions", content=b"{nope",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_worker_4xx_is_returned_as_is(router):
    with pytest.raises(openai.BadRequestError) as err:
        router.client().completions.create(model=SERVED, prompt="x", max_tokens=2, n=3, best_of=4)
    assert "best_of" in str(err.value)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_prefill_worker_dead_falls_back_to_recompute(workers, model, stream):
    from baton.worker.server import create_app

    engine = make_engine(model, role="prefill")
    prefill = RunningServer(create_app(engine, served_model_name=SERVED), engine)
    prefill.start()
    # health checks so rare that the router still believes the prefill worker is alive when it dies
    r = RunningRouter(prefill=[prefill.base_url], decode=[workers["decode"].base_url],
                      health_interval=3600).start()
    try:
        prefill.stop()
        direct = ask(workers["both"].client(), True, "What is the capital?", stream=False)
        got = ask(r.client(), True, "What is the capital?", stream=stream)
        text = stream_text(list(got), True) if stream else text_of(got, True)
        assert text == text_of(direct, True)
        m = settled(r)
        assert outcome(m, "fallback_recompute") == 1 and outcome(m, "ok") == 0
        assert m[("baton_router_hop_errors_total", (("reason", "connection"), ("role", "prefill")))] == 1
        # the dead worker is out of rotation now: the next request goes straight to recompute
        assert ask(r.client(), True, "What is the capital?", stream=False).choices[0].message.content == \
            text_of(direct, True)
        assert outcome(settled(r), "fallback_recompute") == 2
        assert httpx.get(r.base_url + "/ready").status_code == 200  # no prefill: still Ready (recompute)
    finally:
        r.stop()
    wait_idle(workers["decode"].engine)


def test_prefill_5xx_and_lost_kv_fall_back_to_recompute(workers):
    from aiohttp import web

    async def broken(request):
        return web.json_response({"error": {"message": "boom", "code": "engine_error"}}, status=500)

    async def bogus_kv(request):
        body = await request.json()
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        async with httpx.AsyncClient() as c:  # a real prefill, then the KV's address is lost
            resp = (await c.post(workers["prefill"].base_url + path, json=body, timeout=60)).json()
        resp["kv_transfer_params"]["remote_engine_id"] = "no-such-engine"
        return web.json_response(resp)

    direct = ask(workers["both"].client(), False, "Tell me a story", stream=False)
    for handler, hop_error in ((broken, ("prefill", "500")), (bogus_kv, ("decode", "kv_transfer_failed"))):
        stub = Stub(handler).start()
        r = RunningRouter(prefill=[stub.base_url], decode=[workers["decode"].base_url]).start()
        try:
            for stream in (False, True):
                got = ask(r.client(), False, "Tell me a story", stream=stream)
                assert (stream_text(list(got), False) if stream else text_of(got, False)) == \
                    text_of(direct, False)
            m = settled(r)
            assert outcome(m, "fallback_recompute") == 2
            assert m[("baton_router_hop_errors_total", (("reason", hop_error[1]), ("role", hop_error[0])))] == 2
            assert stub.calls == 2
        finally:
            r.stop()
            stub.stop()
    wait_idle(workers["prefill"].engine)
    wait_idle(workers["decode"].engine)


def test_overloaded_workers_give_a_clean_503():
    from aiohttp import web

    async def overloaded(request):
        return web.json_response({"error": {"message": "busy", "code": "engine_overloaded"}}, status=503,
                                 headers={"Retry-After": "1"})

    stubs = [Stub(overloaded).start() for _ in range(2)]
    r = RunningRouter(both=[s.base_url for s in stubs]).start()
    try:
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "x"},
                          headers={"X-Request-Id": "busy-1"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["code"] == "engine_overloaded"
        assert [s.calls for s in stubs] == [1, 1]  # retried once on the other worker, then gave up
        m = settled(r)
        assert outcome(m, "overloaded") == 1
        assert m[("baton_router_retries_total", (("role", "both"),))] == 1
    finally:
        r.stop()
        for s in stubs:
            s.stop()


def test_decode_connection_refused_retries_on_another_worker(workers):
    dead = dead_url()
    r = RunningRouter(both=[dead, workers["both"].base_url], policy="round-robin",
                      health_interval=3600).start()
    try:
        for ep in r.router.pool.all():  # pretend both looked healthy at the last check
            ep.healthy = True
        direct = ask(workers["both"].client(), False, "Hello there", stream=False)
        for stream in (False, True):  # round-robin: one of the two lands on the dead worker first
            got = ask(r.client(), False, "Hello there", stream=stream)
            assert (stream_text(list(got), False) if stream else text_of(got, False)) == text_of(direct, False)
        m = settled(r)
        assert outcome(m, "ok") == 2
        assert m[("baton_router_retries_total", (("role", "both"),))] == 1
        assert [ep.healthy for ep in r.router.pool.all() if ep.url == dead] == [False]
    finally:
        r.stop()


def _baton(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_decode_worker_killed_mid_stream_ends_with_an_error_event(model):
    port = free_port()
    proc = _baton("worker", "--role", "decode", "--model", str(model), "--port", str(port),
                  "--served-model-name", SERVED, "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc)
        r = RunningRouter(decode=[url], prefill=[dead_url()]).start(ready=False)
        try:
            stream = ask(r.client(timeout=30), False, "Once upon a time", stream=True, max_tokens=1000)
            got = []
            t0 = time.monotonic()
            with pytest.raises(openai.APIError) as err:
                for chunk in stream:
                    got.append(chunk)
                    if len(got) == 3:
                        proc.send_signal(signal.SIGKILL)
            assert len(got) < 1000 and time.monotonic() - t0 < 20
            assert "decode worker failed mid-stream" in str(err.value)
            m = settled(r)
            assert outcome(m, "error") == 1
            assert m[("baton_router_hop_errors_total", (("reason", "mid_stream"), ("role", "decode")))] == 1
            assert m[("baton_router_inflight", (("endpoint", url), ("role", "decode")))] == 0
        finally:
            r.stop()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_client_cancellation_reaches_both_workers(workers, router, stream):
    before = settled(router)
    body = {"model": SERVED, "prompt": "Cancel me", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": stream}

    async def go() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.ensure_future(client.post(router.base_url + "/v1/completions", json=body))
            deadline = time.monotonic() + 20
            while workers["decode"].engine.stats().num_running == 0:  # decoding: both hops were sent
                assert not task.done() and time.monotonic() < deadline
                await asyncio.sleep(0.002)
            if stream:
                await asyncio.sleep(0.05)
            task.cancel()  # closes the connection to the router
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    wait_idle(workers["decode"].engine)
    wait_idle(workers["prefill"].engine)
    deadline = time.monotonic() + 5
    while outcome(router.metrics(), "cancelled") < outcome(before, "cancelled") + 1:
        assert time.monotonic() < deadline, "the router never counted the cancellation"
        time.sleep(0.05)
    m = router.metrics()
    assert all(v == 0 for (name, _), v in m.items() if name == "baton_router_inflight")


def test_metrics_move(workers, router):
    before = settled(router)
    chunks = list(ask(router.client(), True, "Count to ten", stream=True, max_tokens=8))
    assert stream_text(chunks, True)
    after = settled(router)
    for name in ("baton_router_ttft_seconds_count", "baton_router_tpot_seconds_count",
                 "baton_router_e2e_request_latency_seconds_count"):
        assert after[(name, ())] == before.get((name, ()), 0) + 1, name
    assert outcome(after, "ok") == outcome(before, "ok") + 1
    ttft = after[("baton_router_ttft_seconds_sum", ())] - before.get(("baton_router_ttft_seconds_sum", ()), 0)
    assert 0 < ttft < 10
    keys = {k for k in after if k[0] == "baton_router_inflight"}
    assert keys == {("baton_router_inflight", (("endpoint", workers[role].base_url), ("role", role)))
                    for role in ("prefill", "decode")}


def test_metric_labels_from_env(monkeypatch):
    from baton.worker.router.metrics import RouterMetrics

    monkeypatch.setenv("BATON_LLMSERVICE", "chat")
    monkeypatch.setenv("BATON_NAMESPACE", "ml")
    text = RouterMetrics().render().decode()
    assert 'baton_router_requests_total{llmservice="chat",namespace="ml",outcome="ok"} 0.0' in text


def test_baton_router_command(workers):
    port = free_port()
    proc = _baton("router", "--policy", "round-robin", "--port", str(port), "--host", "127.0.0.1",
                  "--both", workers["both"].base_url, "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, timeout=30)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        direct = ask(workers["both"].client(), True, "hi", stream=False)
        assert stream_text(list(ask(client, True, "hi", stream=True)), True) == text_of(direct, True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_baton_router_command_errors():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [
        ([], "no workers"),
        (["--prefill", "http://a:1"], "--prefill and --decode go together"),
        (["--both", "ftp://x"], "bad worker URL"),
        (["--both", "http://127.0.0.1:1", "--host", "127.0.0.1", "--port", str(busy.getsockname()[1])],
         "cannot listen on"),
        (["--prefill-service", "a"], "--prefill-service needs --decode-service"),
        (["--both", "http://127.0.0.1:1", "--port", "9500", "--metrics-port", "9500"], "give it a port of its own"),
        (["--both", "http://127.0.0.1:1", "--metrics-port", "70000"], "--metrics-port 70000 is not a port number"),
        (["--both", "http://127.0.0.1:1", "--host", "127.0.0.1", "--port", str(free_port()),
          "--metrics-port", str(busy.getsockname()[1])], "cannot listen on"),
    ]
    try:
        for args, message in cases:
            proc = _baton("router", *args)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 1, out
            lines = out.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("baton router: error:") and message in lines[0], out
    finally:
        busy.close()


def test_metrics_port_serves_the_metrics_and_the_api_port_does_not():
    """`--metrics-port` (what the operator renders): /metrics there; the API port -- what the client-facing
    Service exposes -- answers /metrics with a 404, since the router's metrics name the workers' addresses."""
    from baton.worker.local_fleet import free_ports

    api, metrics = free_ports(2)
    proc = _baton("router", "--both", "http://127.0.0.1:1", "--host", "127.0.0.1", "--port", str(api),
                  "--metrics-port", str(metrics), "--log-level", "warning")
    try:
        from baton.e2e.processes import wait_for

        def listening() -> bool:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the router's metrics port", listening, timeout=60)
        body = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
        assert "baton_router_" in body and "127.0.0.1:1" in body  # the worker's address: why it moved
        assert httpx.get(f"http://127.0.0.1:{api}/metrics", timeout=10).status_code == 404
        assert httpx.get(f"http://127.0.0.1:{api}/health", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{metrics}/health", timeout=10).status_code == 404  # metrics only
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ---------------------------------------------------------------------------------------------- timeouts
# Stub workers that accept the connection and never answer (or stop mid-stream); short timeouts.

SSE_EVENT = b'data: {"id":"s","object":"text_completion","choices":[{"index":0,"text":"hi","finish_reason":null}]}\n\n'


async def _good(request):
    """A worker that answers at once: JSON, or one SSE event and [DONE]."""
    from aiohttp import web

    body = await request.json()
    if not body.get("stream"):
        return web.json_response({"id": "g", "object": "text_completion",
                                  "choices": [{"index": 0, "text": "good", "finish_reason": "length"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(SSE_EVENT + b"data: [DONE]\n\n")
    return resp


async def _until_closed(request) -> None:
    """Wait (answering nothing more) until the router closes the connection."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.02)


class Hung:
    """A worker that reads the request and never answers; counts the connections the router closed."""

    def __init__(self) -> None:
        self.closed = 0

    async def __call__(self, request):
        await _until_closed(request)
        self.closed += 1
        raise ConnectionResetError("the router hung up")

    def wait_closed(self, n: int, timeout: float = 5.0) -> None:
        """Until the router has closed `n` connections (a real worker aborts what it was doing)."""
        deadline = time.monotonic() + timeout
        while self.closed < n:
            assert time.monotonic() < deadline, self.closed
            time.sleep(0.02)


def silent_socket() -> tuple[socket.socket, str]:
    """A listening socket nothing ever accept()s: the kernel completes the handshake, nobody answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def hop_errors(m: dict, role: str, reason: str) -> float:
    return m.get(("baton_router_hop_errors_total", (("reason", reason), ("role", role))), 0.0)


def _first(r: RunningRouter, role: str, url: str) -> None:
    """Every endpoint healthy, and round-robin's next pick is `url`."""
    eps = sorted(r.router.pool.endpoints[role].values(), key=lambda e: e.url)
    for ep in eps:
        ep.healthy = True
    r.router.policy[role].counter = [e.url for e in eps].index(url)


async def _aborted(request):
    """A worker whose engine gave up on the request: 200, an empty choice with finish_reason abort."""
    from aiohttp import web

    await request.read()
    return web.json_response({"id": "a", "object": "text_completion",
                              "choices": [{"index": 0, "text": "", "finish_reason": "abort"}]})


def test_an_aborted_answer_is_never_passed_on_as_a_success():
    """A 200 whose choice the engine aborted (text cut short or empty) is a failed hop: the request moves to
    another worker; with none left, the client gets an error, never an empty 200."""
    stubs = {"aborts": Stub(_aborted).start(), "good": Stub(_good).start()}
    r = RunningRouter(both=[s.base_url for s in stubs.values()], policy="round-robin", health_interval=3600).start()
    try:
        _first(r, "both", stubs["aborts"].base_url)
        resp = httpx.post(r.base_url + "/v1/completions", timeout=CLIENT_TIMEOUT,
                          json={"model": SERVED, "prompt": "x"})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "good", resp.text
        assert (stubs["aborts"].calls, stubs["good"].calls) == (1, 1)
        assert hop_errors(settled(r), "both", "aborted") == 1
    finally:
        r.stop()
    alone = RunningRouter(both=[stubs["aborts"].base_url], health_interval=3600).start()
    try:
        resp = httpx.post(alone.base_url + "/v1/completions", timeout=CLIENT_TIMEOUT,
                          json={"model": SERVED, "prompt": "x"})
        assert resp.status_code == 502 and "aborted" in resp.json()["error"]["message"], resp.text
    finally:
        alone.stop()
        for s in stubs.values():
            s.stop()


def test_hung_worker_times_out_and_the_request_moves_to_another_worker():
    hung = Hung()
    stubs = {"hung": Stub(hung).start(), "good": Stub(_good).start()}
    r = RunningRouter(both=[s.base_url for s in stubs.values()], policy="round-robin", health_interval=3600,
                      hop_timeout=0.5, stream_idle_timeout=5).start()
    try:
        for stream in (False, True):
            _first(r, "both", stubs["hung"].base_url)
            t0 = time.monotonic()
            resp = httpx.post(r.base_url + "/v1/completions", timeout=CLIENT_TIMEOUT,
                              json={"model": SERVED, "prompt": "x", "stream": stream})
            assert resp.status_code == 200
            assert ("data: [DONE]" in resp.text and '"hi"' in resp.text) if stream else \
                resp.json()["choices"][0]["text"] == "good"
            assert 0.5 <= time.monotonic() - t0 < NOT_A_HANG
        assert (stubs["hung"].calls, stubs["good"].calls) == (2, 2)
        m = settled(r)
        assert outcome(m, "ok") == 2
        assert hop_errors(m, "both", "timeout") == 2
        assert m[("baton_router_retries_total", (("role", "both"),))] == 2
        # two hops without an answer are two missed checks, below the threshold: a worker that is only slow
        # is not dropped (WORKER_READINESS); its requests moved on all the same
        ep = r.router.pool.endpoints["both"][stubs["hung"].base_url]
        assert ep.healthy and ep.missed == 2
        hung.wait_closed(2)  # the router closed both timed-out connections
    finally:
        r.stop()
        for s in stubs.values():
            s.stop()


def test_hung_worker_alone_gives_a_502_not_a_hang():
    sock, url = silent_socket()  # accepts (in the kernel) and never reads nor answers
    r = RunningRouter(both=[url], health_interval=3600, hop_timeout=0.5).start(ready=False)
    try:
        _first(r, "both", url)
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "x"},
                          timeout=CLIENT_TIMEOUT)
        assert time.monotonic() - t0 < NOT_A_HANG
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_failed"
        assert "no response within 0.5s" in resp.json()["error"]["message"]
        m = settled(r)
        assert hop_errors(m, "both", "timeout") == 1 and outcome(m, "error") == 1
    finally:
        r.stop()
        sock.close()


def test_prefill_hop_timeout_falls_back_to_recompute():
    sock, url = silent_socket()
    decode = Stub(_good).start()
    r = RunningRouter(prefill=[url], decode=[decode.base_url], health_interval=3600,
                      hop_timeout=0.5).start(ready=False)
    try:
        _first(r, "prefill", url)
        _first(r, "decode", decode.base_url)
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "x"},
                          timeout=CLIENT_TIMEOUT)
        assert time.monotonic() - t0 < NOT_A_HANG
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "good"
        m = settled(r)
        assert hop_errors(m, "prefill", "timeout") == 1 and outcome(m, "fallback_recompute") == 1
    finally:
        r.stop()
        decode.stop()
        sock.close()


def test_decode_hop_stuck_on_a_lost_kv_cache_is_resent_to_recompute():
    """vLLM's decode worker pulling the KV of a prefill worker SIGKILLed after its hop neither fails nor answers
    (NIXL, vLLM 0.32). The router closes that hop after --hop-timeout and resends it without the params: the
    client gets its answer, counted as a recompute, and the stuck hop is closed (the worker aborts it)."""
    from aiohttp import web

    async def prefill(request):
        return web.json_response({"id": "p", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                                  "kv_transfer_params": {"remote_engine_id": "gone"}})

    hung = Hung()

    async def decode(request):  # waits forever on the KV it was sent; recomputes at once without it
        body = await request.json()
        if "kv_transfer_params" in body:
            return await hung(request)
        return await _good(request)

    stubs = {"prefill": Stub(prefill).start(), "decode": Stub(decode).start()}
    r = RunningRouter(prefill=[stubs["prefill"].base_url], decode=[stubs["decode"].base_url],
                      health_interval=3600, hop_timeout=0.5).start()
    try:
        for stream in (False, True):
            t0 = time.monotonic()
            resp = httpx.post(r.base_url + "/v1/completions", timeout=CLIENT_TIMEOUT,
                              json={"model": SERVED, "prompt": "x", "stream": stream})
            assert resp.status_code == 200, resp.text
            assert ('"hi"' in resp.text) if stream else resp.json()["choices"][0]["text"] == "good"
            assert 0.5 <= time.monotonic() - t0 < NOT_A_HANG
        m = settled(r)
        assert hop_errors(m, "decode", "timeout") == 2
        assert outcome(m, "fallback_recompute") == 2 and outcome(m, "error") == 0
        assert stubs["decode"].calls == 4  # each request: the stuck hop and its resend
        hung.wait_closed(2)  # both stuck hops closed
    finally:
        r.stop()
        for s in stubs.values():
            s.stop()


def test_stream_idle_timeout_before_and_after_the_first_event():
    from aiohttp import web

    async def silent_sse(request):  # headers, then nothing
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await _until_closed(request)
        return resp

    async def stalls_mid_stream(request):  # one event, then nothing
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(SSE_EVENT)
        await _until_closed(request)
        return resp

    body = {"model": SERVED, "prompt": "x", "stream": True}
    stubs = {"silent": Stub(silent_sse).start(), "good": Stub(_good).start(), "stall": Stub(stalls_mid_stream).start()}
    r = RunningRouter(both=[stubs["silent"].base_url, stubs["good"].base_url], policy="round-robin",
                      health_interval=3600, hop_timeout=5, stream_idle_timeout=0.5).start()
    alone = RunningRouter(both=[stubs["stall"].base_url], health_interval=3600, hop_timeout=5,
                          stream_idle_timeout=0.5).start()
    try:
        # nothing reached the client yet: another worker answers
        _first(r, "both", stubs["silent"].base_url)
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
        assert resp.status_code == 200 and '"hi"' in resp.text and resp.text.endswith("data: [DONE]\n\n")
        assert 0.5 <= time.monotonic() - t0 < NOT_A_HANG
        m = settled(r)
        assert hop_errors(m, "both", "timeout") == 1 and outcome(m, "ok") == 1
        assert stubs["silent"].calls == 1 and stubs["good"].calls == 1

        # mid-stream: the event already sent stays, then a clean error event and [DONE]
        t0 = time.monotonic()
        resp = httpx.post(alone.base_url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
        assert time.monotonic() - t0 < NOT_A_HANG
        events = [e for e in resp.text.split("\n\n") if e]
        assert resp.status_code == 200 and len(events) == 3, resp.text
        assert events[0].encode() + b"\n\n" == SSE_EVENT and events[2] == "data: [DONE]"
        error = json.loads(events[1].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_failed" and "no bytes for 0.5s" in error["message"]
        m = settled(alone)
        assert hop_errors(m, "both", "timeout") == 1 and hop_errors(m, "both", "mid_stream") == 0
        assert outcome(m, "error") == 1
    finally:
        r.stop()
        alone.stop()
        for s in stubs.values():
            s.stop()


def test_timeout_flags():
    from baton.worker.router.cli import build_config

    from baton.cli import build_parser

    args = build_parser().parse_args(["router", "--both", "http://w:8000", "--hop-timeout", "2.5",
                                      "--stream-idle-timeout", "0"])
    cfg = build_config(args)
    assert (cfg.hop_timeout, cfg.stream_idle_timeout) == (2.5, 0)
    args = build_parser().parse_args(["router", "--both", "http://w:8000"])
    assert (args.hop_timeout, args.stream_idle_timeout) == (60.0, 60.0)
