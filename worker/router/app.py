"""The router's HTTP app (aiohttp server + one pooled aiohttp client session).

Why aiohttp and not FastAPI/uvicorn + httpx: the router does no validation or model work, so its cost is
pure HTTP plumbing; aiohttp's server and client share one event loop with C-accelerated HTTP parsers and a
keep-alive connection pool, with far less per-request Python than Starlette's middleware/ASGI layers plus
httpx's transport stack (measured by benchmarks/router.py), and it is a core dependency of baton, so the
router runs without the worker extras (fastapi, uvicorn, torch).

Flow of POST /v1/completions and /v1/chat/completions (the body is forwarded as JSON; fields are left to the
workers to validate, except `stream` and the prompt the prefix-aware policy hashes). KV transfer parameters
are the router's alone: the client's `kv_transfer_params` (and `vllm_xargs.kv_transfer_params`, which vLLM
reads when the top-level field is absent) are dropped before any hop (`strip_kv_params`), so a decode worker
only ever pulls the KV the router's own prefill hop produced:

1. Disaggregated (a healthy prefill and decode worker exist): the prefill hop (`prefill_tier.py`: a prefill
   worker computes the prompt and returns `kv_transfer_params`, under the prefill-failure policy: another
   prefill worker, then recompute on decode while decode has TPOT headroom (outcome `fallback_recompute`), else
   503 + Retry-After (outcome `rejected`); a 4xx is the client's error, returned as is), then a decode worker
   gets the original body plus the params; its response (JSON or SSE bytes) goes back unchanged. Both hops
   carry the same `X-Request-Id` (the client's, or a new one). KV moves only between equal KV layouts (`pairing.py`).
2. Colocated (only `both` workers): one hop to a `both` worker, outcome `ok`.
3. Decode workers only: with no prefill worker at all (a decode-only fleet) one hop to a decode worker without
   params (recompute), outcome `fallback_recompute`; with prefill workers but none healthy, the same policy as a
   failed prefill hop (recompute or 503). The router stays Ready in this state (`Pool.ready`).
4. No decode (or both) worker: 503 with Retry-After, and /ready answers 503.

The last hop is retried (same X-Request-Id, other worker where possible) only while no byte has reached the
client: connection errors and 5xx move to another worker; a 502 `kv_transfer_failed` resends without params
(recompute), and so does a 500 from a decode worker that got kv_transfer_params (vLLM's answer to a failed KV
load; the prefill-failure policy does not apply: the KV existed), and a 403 `kv_params_rejected` (a Baton decode
worker that cannot verify the prefill worker's signature on them: `kv/params_auth.py`; e.g. a KV-secret rotation
caught between old and new pods, or params that expired in a queue); when every worker answered 503 the client gets
503 + Retry-After (outcome `overloaded`). Once streaming started, an upstream failure ends the stream with an
OpenAI error event and `[DONE]` (no hang). A client that goes away cancels the handler (aiohttp
`handler_cancellation`), which closes the upstream connections, so the workers abort the request. Every hop is
bounded by the hop timeouts (`hops.py`): a timed-out prefill hop is a prefill failure, a timed-out last hop is
retried while nothing reached the client, a stream that already started ends with an error event.

TTFT stages: the workers' `Server-Timing` headers and the router's own hop times split each request's TTFT
(`stages.py`, `baton_router_ttft_stage_seconds{stage}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import aiohttp
from aiohttp import web
from baton.worker.router import spans
from baton.worker.router.config import DEFAULT_WORKER_WAIT, RouterConfig  # noqa: F401 - re-exported
from baton.worker.router.discovery import KubernetesDiscovery
from baton.worker.router.drain import (
    DRAIN_KEY,
    DrainState,
    close_while_draining,
    counting_middleware,
    drain,
)
from baton.worker.router.hops import (
    UPSTREAM_ERRORS,
    HopFailed,
    Upstream,
    describe,
    error_json,
    kv_lost,
    reason_of,
    sse_error,
)
from baton.worker.router.metrics import CONTENT_TYPE, RouterMetrics
from baton.worker.router.pairing import for_kv, match
from baton.worker.router.policy import PrefixAware, make_policy
from baton.worker.router.pool import Endpoint, HealthChecker, Pool
from baton.worker.router.prefill_failure import TPOTWindow
from baton.worker.router.prefill_tier import PrefillTier
from baton.worker.router.request import (
    KV_PARAMS,
    RequestState,
    compact_json,
    routing_key,
    strip_kv_params,
)
from baton.worker.router.stages import Hop, ttft_stages
from baton.worker.tracing import tracer_for

from baton.launch import METRICS_PATH, ErrorCode, Header, parse_server_timing

log = logging.getLogger("baton.router")

REQUEST_ID = Header.REQUEST_ID
RETRY_AFTER = "1"
WORKER_WAIT_POLL = 0.1  # how often a request waiting for a serving worker (`RouterConfig.worker_wait`) looks


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics(config.llmservice, config.metrics_namespace)
        self.pool = Pool(on_change=self._on_change, on_remove=self._on_remove, timing=config.health)
        self.policy = {
            "prefill": make_policy(config.policy, prefix_chars=config.prefix_chars, seed=config.seed),
            "both": make_policy(config.policy, prefix_chars=config.prefix_chars, seed=config.seed),
            # the prefix cache that matters is where the prompt is computed: decode balances load
            "decode": make_policy(
                "least-loaded" if config.policy == "prefix-aware" else config.policy, seed=config.seed
            ),
        }
        self.prefix_aware = isinstance(self.policy["prefill"], PrefixAware)
        self.tpot_window = TPOTWindow(config.headroom_window)  # the `whenHeadroom` evidence
        # OpenTelemetry traces (`spans.py`): a no-op tracer unless an endpoint is configured
        self.tracer = tracer_for(config.otlp_traces_endpoint, "router", config.llmservice, config.metrics_namespace)
        self.session: aiohttp.ClientSession | None = None
        self.checker: HealthChecker | None = None
        self.discovery: KubernetesDiscovery | None = None
        self.upstream: Upstream | None = None
        self.prefill_tier: PrefillTier | None = None
        self.drain_state = DrainState()  # requests in flight (`create_app`'s middleware) and the drain (drain.py)

    # --------------------------------------------------------------------------------------- lifecycle

    def _on_change(self, ep: Endpoint) -> None:
        self.metrics.set_inflight(ep.role, ep.url, ep.inflight)

    def _on_remove(self, ep: Endpoint) -> None:
        self.metrics.forget(ep.role, ep.url)

    async def start(self) -> None:
        cfg = self.config
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout,
                                          sock_connect=cfg.connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.upstream = Upstream(self.session, cfg.hop_timeout, cfg.stream_idle_timeout)
        self.prefill_tier = PrefillTier(self.pool, self.policy["prefill"], self.upstream, self.metrics,
                                        self.tpot_window, cfg.prefill_failure, announce=cfg.kv_announce,
                                        tracer=self.tracer)
        for role in ("prefill", "decode", "both"):
            urls = getattr(cfg, role)
            self.pool.set_urls(role, urls)
            for ep in self.pool.endpoints[role].values():
                self.metrics.set_inflight(role, ep.url, 0)
        self.checker = HealthChecker(self.pool, self.session, cfg.health_interval, cfg.health.timeout_seconds,
                                     path=cfg.health_path)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.checker.check_all(), cfg.health.timeout_seconds + 0.5)
        self.checker.start()
        if cfg.services():
            self.discovery = KubernetesDiscovery(
                self.pool, self.checker, cfg.namespace or "default", cfg.services(),
                cfg.discovery_interval, api=cfg.kube_api,
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.discovery.poll_once(), 10)
            self.discovery.start()

    async def stop(self) -> None:
        if self.prefill_tier is not None:
            self.prefill_tier.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.checker is not None:
            await self.checker.stop()
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.tracer.shutdown)  # the spans still batched go out now

    # --------------------------------------------------------------------------------------- handlers

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.drain_state.draining:  # out of rotation: the pod is leaving (drain.py)
            return error_json("draining: finishing the requests in flight before shutting down", status=503,
                              type="service_unavailable_error", code="not_ready",
                              headers={"Retry-After": RETRY_AFTER})
        ok, why = self.pool.ready()
        if ok:  # the counts tell a starting fleet when the router has seen every worker (`all_workers_seen`)
            return web.json_response({"status": "ready", "workers": self.pool.counts()})
        return error_json(why, status=503, type="service_unavailable_error", code="not_ready",
                          headers={"Retry-After": RETRY_AFTER})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        for role in ("both", "decode", "prefill"):
            for ep in self.pool.healthy(role):
                try:
                    async with self.session.get(ep.url + "/v1/models",
                                                timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        data = await resp.read()
                        if resp.status == 200:
                            return web.Response(body=data, content_type="application/json")
                except UPSTREAM_ERRORS as exc:
                    ep.fail(exc)
        return error_json("no healthy worker to list the models", status=503,
                          type="service_unavailable_error", code="no_workers",
                          headers={"Retry-After": RETRY_AFTER})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/chat/completions")

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        req = RequestState()
        spans.start_request(self.tracer, req, request.headers, path)
        try:
            return await self._handle(request, path, req)
        except asyncio.CancelledError:
            if not req.done:  # a client that hangs up after [DONE] got its whole answer
                req.outcome = "cancelled"
            raise
        except Exception:
            log.exception("router error on %s", path)
            req.outcome = "error"
            return error_json("internal router error", status=500, type="internal_server_error")
        finally:
            self._record(req)
            spans.end_request(self.tracer, req)

    def _record(self, req: RequestState) -> None:
        if not req.recorded:
            req.recorded = True
            self.metrics.outcome(req.outcome)

    async def _handle(self, request: web.Request, path: str, req: RequestState) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_json(f"the request body is not valid JSON: {exc}", status=400,
                              type="invalid_request_error")
        if not isinstance(body, dict):
            return error_json("the request body must be a JSON object", status=400,
                              type="invalid_request_error")
        clean = strip_kv_params(body)
        if clean is not None:  # every hop below is built from `body` or `raw`: both are clean from here
            log.debug("dropped client-supplied KV transfer parameters on %s", path)
            body, raw = clean, compact_json(clean)
        rid = (request.headers.get(REQUEST_ID) or "").strip() or uuid.uuid4().hex
        req.request_id = rid
        headers = {"Content-Type": "application/json", REQUEST_ID: rid}
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        key = routing_key(body, self.config.prefix_chars) if self.prefix_aware else None
        pool = self.pool
        if not (pool.healthy("decode") or pool.healthy("both")):
            await self._wait_for_healthy("decode", "both")  # prefill is optional: decode can recompute

        if pool.healthy("prefill") and pool.healthy("decode"):
            kv, early = await self.prefill_tier.run(path, body, headers, key, req)
            if early is not None:
                return early  # the prefill worker refused the request (4xx), or the policy's 503
            if kv is not None:
                data = compact_json({**body, KV_PARAMS: kv})
                return await self._last_hop(request, "decode", path, data, raw, headers, body, key, req,
                                            recompute=False)
            return await self._last_hop(request, "decode", path, raw, raw, headers, body, key, req,
                                        recompute=True)
        if pool.healthy("both"):
            return await self._last_hop(request, "both", path, raw, raw, headers, body, key, req,
                                        recompute=False)
        if pool.healthy("decode"):
            if self._has_prefill_tier():  # a prefill tier exists, none of it healthy: a prefill failure
                early = self.prefill_tier.failed(req, headers)
                if early is not None:
                    return early
            return await self._last_hop(request, "decode", path, raw, raw, headers, body, key, req,
                                        recompute=True)
        _, why = pool.ready()
        return error_json(f"no decode worker is available: {why}", status=503,
                          type="service_unavailable_error", code="no_workers",
                          headers={"Retry-After": RETRY_AFTER})

    def _has_prefill_tier(self) -> bool:
        """A prefill tier was configured (URLs or a Service), whether or not any of its workers is up now. The
        Endpoints of a Service drop crashed pods, so an empty prefill pool there means "prefill is down" (the
        prefill-failure policy decides), not a decode-only fleet (which recomputes by design)."""
        c = self.config
        return bool(c.prefill or c.prefill_service or self.pool.endpoints["prefill"])

    async def _wait_for_healthy(self, *roles: str) -> None:
        """Hold a request while no worker of `roles` is healthy -- a sole decode pod being replaced, a fleet
        still starting -- for up to `worker_wait` seconds; the caller answers 503 if none came. Bounded: never
        a hang."""
        deadline = time.monotonic() + max(0.0, self.config.worker_wait)
        while time.monotonic() < deadline:
            await asyncio.sleep(WORKER_WAIT_POLL)
            if any(self.pool.healthy(role) for role in roles):
                return

    async def _last_hop(self, request: web.Request, role: str, path: str, data: bytes, raw: bytes,
                        headers: dict, body: dict, key: str | None, req: RequestState, *, recompute: bool
                        ) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        tried: list[Endpoint] = []
        last: HopFailed | None = None
        overloaded = 0
        for attempt in range(max(1, self.config.max_attempts)):
            candidates = self.pool.healthy(role, exclude=tried)
            if not candidates and last is None:
                # none before any attempt: the last one left while the prefill hop ran (or between the check on
                # entry and here): wait for one as the entry does, rather than fail
                await self._wait_for_healthy(role)
                candidates = self.pool.healthy(role, exclude=tried)
            if not candidates:
                break
            if role == "decode" and not recompute:  # the KV fits only decode workers of its layout (pairing.py)
                candidates, recompute = for_kv(req.kv_from, candidates)
                if recompute:  # none left: recompute rather than hand the KV across layouts
                    data = raw
                    self.metrics.layout_mismatch.inc()
            ep = self.policy[role].choose(candidates, key)
            if role == "decode" and not recompute:
                self.metrics.kv_handoff(match(req.kv_from, ep.fingerprint))
            if attempt:
                self.metrics.retry(role)
            try:
                return await self._send(request, ep, role, path, data, headers, stream, req, recompute, attempt)
            except HopFailed as hop:
                last = hop
                self.metrics.hop_error(role, hop.reason)
                log.warning("%s hop to %s failed: %s", role, ep.url, hop.message)
                if not recompute and kv_lost(role, hop.reason):
                    data, recompute = raw, True  # the KV is lost: the decode worker recomputes the prompt
                    continue
                if hop.reason == "overloaded":
                    overloaded += 1
                if hop.exclude:
                    tried.append(ep)
        if last is None:
            _, why = self.pool.ready()
            return error_json(f"no {role} worker is available: {why}", status=503,
                              type="service_unavailable_error", code="no_workers",
                              headers={"Retry-After": RETRY_AFTER})
        if overloaded and last.reason == "overloaded":
            req.outcome = "overloaded"
            return error_json(f"all {role} workers are overloaded; retry later", status=503,
                              type="service_unavailable_error", code="engine_overloaded",
                              headers={"Retry-After": RETRY_AFTER})
        return error_json(f"the {role} worker failed: {last.message}", status=502, type="upstream_error",
                          code="upstream_failed")

    async def _send(self, request: web.Request, ep: Endpoint, role: str, path: str, data: bytes,
                    headers: dict, stream: bool, req: RequestState, recompute: bool, attempt: int = 0
                    ) -> web.StreamResponse:
        """One attempt at the last hop (its own span). Raises HopFailed while nothing reached the client."""
        sent = time.monotonic()
        span = spans.start_hop(self.tracer, req, role, ep.url, sent, attempt)
        error: str | None = None
        try:
            return await self._send_once(request, ep, role, path, data, self.tracer.inject(span, headers), stream,
                                         req, recompute, sent)
        except HopFailed as hop:
            error = f"{hop.reason}: {hop.message}"
            raise
        finally:
            self.tracer.finish(span, error=error)

    async def _send_once(self, request: web.Request, ep: Endpoint, role: str, path: str, data: bytes,
                         headers: dict, stream: bool, req: RequestState, recompute: bool, sent: float
                         ) -> web.StreamResponse:
        ep.acquire()
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await self.upstream.post(ep.url + path, data, headers)
            except UPSTREAM_ERRORS as exc:
                ep.fail(exc)
                raise HopFailed(reason_of(exc), describe(exc)) from None
            rid = resp.headers.get(REQUEST_ID, headers[REQUEST_ID])
            req.decode_hop = Hop(sent - req.arrival, parse_server_timing(resp.headers.get(Header.SERVER_TIMING)))
            if resp.status != 200:
                try:
                    payload = await self.upstream.read(resp)
                except UPSTREAM_ERRORS as exc:
                    ep.fail(exc)
                    raise HopFailed(reason_of(exc), describe(exc)) from None
                return self._refused(resp, payload, rid, req)
            if not stream or not resp.content_type.startswith("text/event-stream"):
                try:
                    payload = await self.upstream.read(resp)
                except UPSTREAM_ERRORS as exc:
                    ep.fail(exc)
                    raise HopFailed(reason_of(exc), describe(exc)) from None
                if aborted_answer(payload):  # an answer the engine gave up on is not one: another attempt
                    raise HopFailed("aborted", "answered 200 with a choice the engine aborted "
                                    "(finish_reason abort): an incomplete answer")
                now = time.monotonic()
                self._first_token(req, now - req.arrival)
                self.metrics.e2e.observe(now - req.arrival)
                req.outcome = "fallback_recompute" if recompute else "ok"
                return web.Response(body=payload, status=200, headers={
                    "Content-Type": resp.headers.get("Content-Type", "application/json"), REQUEST_ID: rid})
            return await self._pipe(request, resp, ep, rid, req, recompute)
        finally:
            if resp is not None:
                resp.close()  # a no-op after a complete body; closes (so the worker aborts) otherwise
            ep.release()

    def _refused(self, resp: aiohttp.ClientResponse, payload: bytes, rid: str, req: RequestState
                 ) -> web.Response:
        status = resp.status
        code = message = None
        with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
            err = json.loads(payload)["error"]
            code, message = err.get("code"), err.get("message")
        if status == 502 and code == ErrorCode.KV_TRANSFER_FAILED:
            raise HopFailed(ErrorCode.KV_TRANSFER_FAILED, "the KV transfer from the prefill worker failed", exclude=False)
        if status == 403 and code == ErrorCode.KV_PARAMS_REJECTED:  # the decode worker would not trust the prefill's params
            raise HopFailed(ErrorCode.KV_PARAMS_REJECTED, f"the decode worker refused the prefill worker's kv_transfer_params: "
                            f"{message}", exclude=False)
        if status == 503:
            raise HopFailed("overloaded", f"answered 503 ({code or 'unavailable'})")
        if status >= 500:
            raise HopFailed(str(status), f"answered {status}: {payload[:200].decode('utf-8', 'replace')}")
        req.outcome = "error"  # the client's error (4xx): returned as the worker said it
        return web.Response(body=payload, status=status, headers={
            "Content-Type": resp.headers.get("Content-Type", "application/json"), REQUEST_ID: rid})

    async def _pipe(self, request: web.Request, resp: aiohttp.ClientResponse, ep: Endpoint, rid: str,
                    req: RequestState, recompute: bool) -> web.StreamResponse:
        """Stream the worker's SSE bytes to the client, whole events at a time."""
        out: web.StreamResponse | None = None
        buf = b""
        failure: str | None = None
        reason = "connection"
        while True:
            try:
                chunk = await self.upstream.chunk(resp)
            except UPSTREAM_ERRORS as exc:
                failure, reason = describe(exc), reason_of(exc)
                break
            if not chunk:
                break
            buf += chunk
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            events, buf = buf[: cut + 2], buf[cut + 2:]
            if out is None:
                out = web.StreamResponse(status=200, headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache", REQUEST_ID: rid})
                try:
                    await out.prepare(request)
                except (ConnectionError, RuntimeError):
                    req.outcome = "cancelled"
                    return out
            had_first = req.first_at is not None
            req.scan(events)
            try:
                await out.write(events)
            except (ConnectionError, RuntimeError):
                req.outcome = "cancelled"  # the client went away; closing `resp` aborts the worker
                return out
            if not had_first and req.first_at is not None:
                req.first_at = time.monotonic()
                self._first_token(req, req.first_at - req.arrival)
            if req.done and not req.finished:
                self._finished(req, recompute)  # before EOF: the client may hang up right after [DONE]
        if req.done:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write_eof()
            return out
        if failure is None:
            failure = "the worker ended the stream early"
        if out is None:  # nothing reached the client: another worker may answer
            ep.miss(failure)
            raise HopFailed(reason, failure)
        log.warning("%s worker %s failed mid-stream of %s: %s", ep.role, ep.url, rid, failure)
        if reason == "timeout":
            ep.miss(failure)
        self.metrics.hop_error(ep.role, "timeout" if reason == "timeout" else "mid_stream")
        req.outcome = "error"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write(sse_error(f"the {ep.role} worker failed mid-stream: {failure}", "upstream_failed"))
            await out.write_eof()
        return out

    def _first_token(self, req: RequestState, ttft: float) -> None:
        """TTFT, and its stages from the hops' Server-Timing (`stages.py`); the same on the request's span."""
        self.metrics.ttft.observe(ttft)
        stages = ttft_stages(ttft, req.prefill_hop, req.decode_hop)
        self.metrics.observe_stages(stages)
        spans.first_token(self.tracer, req, ttft, stages)

    def _finished(self, req: RequestState, recompute: bool) -> None:
        req.finished = True
        req.outcome = "error" if req.error else ("fallback_recompute" if recompute else "ok")
        self._record(req)  # now: the client may read [DONE] (and scrape) before this handler ends
        if req.error:
            return
        now = time.monotonic()
        self.metrics.e2e.observe(now - req.arrival)
        tokens = req.usage_tokens if req.usage_tokens is not None else req.tokens
        if req.first_at is not None and tokens >= 2:
            tpot = (now - req.first_at) / (tokens - 1)
            self.metrics.tpot.observe(tpot)
            self.tpot_window.observe(tpot)


ROUTER_KEY = web.AppKey("baton_router", Router)


def create_app(config: RouterConfig, *, with_metrics: bool = True) -> web.Application:
    """The router's aiohttp app; run it with `handler_cancellation=True` (see `serve`). `with_metrics=False`:
    no /metrics on it (`metrics_app` serves them on a listener of its own)."""
    router = Router(config)
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[counting_middleware(router.drain_state)])
    app[ROUTER_KEY] = router
    app[DRAIN_KEY] = router.drain_state
    app.on_response_prepare.append(close_while_draining(router.drain_state))

    async def on_startup(app: web.Application) -> None:
        await router.start()

    async def on_cleanup(app: web.Application) -> None:
        await router.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/completions", router.completions)
    app.router.add_post("/v1/chat/completions", router.chat_completions)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_get("/ready", router.ready)
    if with_metrics:
        app.router.add_get(METRICS_PATH, router.metrics_handler)
    return app


def metrics_app(router: Router) -> web.Application:
    """/metrics of `router` alone: what a pod's metrics port serves, so that the client-facing Service (the API
    port) does not hand out the router's metrics, which name the worker pods' addresses."""
    app = web.Application()
    app.router.add_get(METRICS_PATH, router.metrics_handler)
    return app


def aborted_answer(payload: bytes) -> bool:
    """Whether a worker's 200 (non-streamed) answer holds a choice its engine aborted (`finish_reason: abort`,
    what Baton's engine and vLLM report for a request they gave up on): text cut short or empty, which the
    router must never hand on as a success. Pure."""
    try:
        choices = json.loads(payload).get("choices")
    except (ValueError, AttributeError):
        return False
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "abort"
                                             for c in choices)


async def serve(config: RouterConfig, sockets: list, stop: asyncio.Event | None = None,
                metrics_sockets: list = (), drain_on: asyncio.Event | None = None, drain_timeout: float = 0.0) -> None:
    """Serve on already-bound `sockets` until `stop` is set (or forever); with `metrics_sockets`, /metrics is
    served there and not on `sockets`. `drain_on` set (SIGTERM) with `drain_timeout` > 0: drain first
    (`drain.py`), then stop; with no drain timeout it stops at once, like `stop`."""
    app = create_app(config, with_metrics=not metrics_sockets)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    metrics_runner = web.AppRunner(metrics_app(app[ROUTER_KEY]), access_log=None, shutdown_timeout=1) \
        if metrics_sockets else None
    await runner.setup()
    try:
        if metrics_runner is not None:
            await metrics_runner.setup()
            for sock in metrics_sockets:
                await web.SockSite(metrics_runner, sock).start()
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        stop = stop if stop is not None else asyncio.Event()
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, drain_on) if e is not None]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if drain_on is not None and drain_on.is_set() and not stop.is_set() and drain_timeout > 0:
            await drain(app[DRAIN_KEY], runner, stop, drain_timeout)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
