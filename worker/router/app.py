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

1. Disaggregated (a healthy prefill and decode worker exist): pick a prefill worker, send the prefill hop
   (same body, `stream: false`, `max_tokens: 1`, `kv_transfer_params: {"do_remote_decode": true}`), then pick
   a decode worker and send the original body plus the returned `kv_transfer_params`; its response (JSON or
   SSE bytes) goes back unchanged. Both hops carry the same `X-Request-Id` (the client's, or a new one).
   If the prefill hop fails (connection error, timeout, 5xx, or no params back) the prefill-failure policy
   (`prefill_failure.py`, `--prefill-retries/--prefill-recompute/--prefill-retry-after`) decides: another
   prefill worker, then the decode worker recomputing the prompt (outcome `fallback_recompute`) while decode
   has TPOT headroom, else 503 + Retry-After (outcome `rejected`). A 4xx from the prefill hop is the client's
   error and is returned as is.
2. Colocated (only `both` workers): one hop to a `both` worker, outcome `ok`.
3. Decode workers only: with no prefill worker at all (a decode-only fleet) one hop to a decode worker without
   params (recompute), outcome `fallback_recompute`; with prefill workers but none healthy, the same policy as a
   failed prefill hop (recompute or 503). The router stays Ready in this state (`Pool.ready`).
4. No decode (or both) worker: 503 with Retry-After, and /ready answers 503.

The last hop is retried (same X-Request-Id, other worker where possible) only while no byte has reached the
client: connection errors and 5xx move to another worker; a 502 `kv_transfer_failed` resends without params
(recompute), and so does a 500 from a decode worker that got kv_transfer_params (vLLM's answer to a failed KV
load; the prefill-failure policy does not apply: the KV existed); when every worker answered 503 the client gets
503 + Retry-After (outcome `overloaded`). Once
streaming started, an upstream failure ends the stream with an OpenAI error event and `[DONE]` (no hang).
A client that goes away cancels the handler (aiohttp `handler_cancellation`), which closes the upstream
connections, so the workers abort the request.

Timeouts (a worker that accepts the connection but never answers must not hold a request forever): every hop
must return its response headers within `hop_timeout` seconds (time to first byte), and once they are in, no
more than `stream_idle_timeout` seconds may pass without a byte of the body (SSE or JSON). Either expiry
closes the upstream connection and counts as a failed hop (`baton_router_hop_errors_total{reason="timeout"}`,
the endpoint is marked unhealthy until its next passing health check): a prefill hop is a prefill failure,
the last hop is retried on another worker while nothing reached the client, and a stream that already
started ends with an OpenAI error event and `[DONE]`. 0 (or None) disables a timeout.

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
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from baton.worker.router.announce import SSEEvents, announced_kv
from baton.worker.router.discovery import KubernetesDiscovery
from baton.worker.router.metrics import CONTENT_TYPE, RouterMetrics
from baton.worker.router.policy import DEFAULT_PREFIX_CHARS, PrefixAware, make_policy
from baton.worker.router.pool import DEFAULT_HEALTH_PATH, Endpoint, HealthChecker, Pool
from baton.worker.router.prefill_failure import (
    HEADROOM_WINDOW,
    RECOMPUTE,
    RETRY,
    PrefillFailurePolicy,
    TPOTWindow,
    decide,
    has_headroom,
)
from baton.worker.router.request import (
    KV_PARAMS,
    SSE_DONE,
    RequestState,
    compact_json,
    routing_key,
    strip_kv_params,
)
from baton.worker.router.stages import Hop, ttft_stages

from baton.launch import KV_ANNOUNCE, RECOMPUTE_NEVER, Header, parse_server_timing

log = logging.getLogger("baton.router")

REQUEST_ID = Header.REQUEST_ID
RETRY_AFTER = "1"
#: How long a request waits for a serving worker when there is none (`--worker-wait`), and how often it looks.
#: 60 s covers a decode pod's replacement starting and loading a small model (measured: about 25 s on a busy
#: 2-core node); a client sees latency, not an error. Larger models: raise it, or run two decode replicas.
DEFAULT_WORKER_WAIT = 60.0
WORKER_WAIT_POLL = 0.1
_UPSTREAM_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError)


@dataclass
class RouterConfig:
    policy: str = "least-loaded"
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)
    namespace: str | None = None  # Kubernetes namespace of the Services
    prefill_service: str | None = None
    decode_service: str | None = None
    both_service: str | None = None
    health_interval: float = 2.0
    health_timeout: float = 1.0
    health_path: str = DEFAULT_HEALTH_PATH  # GET on each worker: /ready (Baton), /health (vLLM)
    discovery_interval: float = 2.0
    connect_timeout: float = 5.0
    hop_timeout: float | None = 60.0  # seconds until a worker's response headers (0/None: no limit)
    stream_idle_timeout: float | None = 60.0  # seconds without a byte of the response body (0/None: no limit)
    worker_wait: float = DEFAULT_WORKER_WAIT  # seconds a request waits for a serving worker when there is none
    max_attempts: int = 3
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    llmservice: str | None = None  # metric labels (default: env BATON_LLMSERVICE / BATON_NAMESPACE)
    metrics_namespace: str | None = None
    seed: int | None = None
    kube_api: Any = None  # a CoreV1Api-like object (tests); default: in-cluster config or kubeconfig
    prefill_failure: PrefillFailurePolicy = field(default_factory=PrefillFailurePolicy)
    headroom_window: float = HEADROOM_WINDOW  # seconds of TPOTs the `whenHeadroom` decision reads
    kv_announce: bool = False  # ask Baton prefill workers to announce the KV before the prefill ends (announce.py)

    def services(self) -> dict[str, str]:
        return {
            role: name
            for role, name in (
                ("prefill", self.prefill_service),
                ("decode", self.decode_service),
                ("both", self.both_service),
            )
            if name
        }


def error_json(message: str, *, status: int, type: str, code: str | None = None,
               param: str | None = None, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/json", headers=headers
    )


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n" + SSE_DONE


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The hop-error reason of an upstream exception: `timeout` (--hop-timeout, --stream-idle-timeout) or
    `connection` (anything else, a connect timeout included)."""
    return "timeout" if isinstance(exc, HopTimeout) else "connection"


def _limit(seconds: float | None) -> float | None:
    return seconds if seconds else None  # 0 / None: no limit


def _kv_lost(role: str, reason: str) -> bool:
    """Whether a failed decode hop that carried kv_transfer_params should be resent without them (the decode
    worker recomputes the prompt). Baton's workers say so precisely (502 `kv_transfer_failed`); vLLM's answer a
    failed KV load (a prefill worker that died after its hop, an expired or foreign lease) with a plain 500
    under `kv_load_failure_policy: fail`, its default. A 500 from an engine that is really broken fails again
    without the params and then moves on to another worker, so resending once costs one attempt at most."""
    return reason == "kv_transfer_failed" or (role == "decode" and reason == "500")


class HopTimeout(asyncio.TimeoutError):
    """One of the router's own hop timeouts expired (a readable message instead of a bare TimeoutError)."""


class _Hop(Exception):
    """A failed attempt at the last hop that may be retried (no byte reached the client)."""

    def __init__(self, reason: str, message: str, *, exclude: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exclude = exclude


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics(config.llmservice, config.metrics_namespace)
        self.pool = Pool(on_change=self._on_change, on_remove=self._on_remove)
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
        self.session: aiohttp.ClientSession | None = None
        self.checker: HealthChecker | None = None
        self.discovery: KubernetesDiscovery | None = None
        self._drains: set[asyncio.Task] = set()  # announced prefill streams still being read to their end

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
        for role in ("prefill", "decode", "both"):
            urls = getattr(cfg, role)
            self.pool.set_urls(role, urls)
            for ep in self.pool.endpoints[role].values():
                self.metrics.set_inflight(role, ep.url, 0)
        self.checker = HealthChecker(self.pool, self.session, cfg.health_interval, cfg.health_timeout,
                                     path=cfg.health_path)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.checker.check_all(), cfg.health_timeout + 0.5)
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
        for task in list(self._drains):
            task.cancel()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.checker is not None:
            await self.checker.stop()
        if self.session is not None:
            await self.session.close()

    # --------------------------------------------------------------------------------------- handlers

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
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
                except _UPSTREAM_ERRORS as exc:
                    ep.mark(False, _describe(exc))
        return error_json("no healthy worker to list the models", status=503,
                          type="service_unavailable_error", code="no_workers",
                          headers={"Retry-After": RETRY_AFTER})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/chat/completions")

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        req = RequestState()
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
        headers = {"Content-Type": "application/json", REQUEST_ID: rid}
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        key = routing_key(body, self.config.prefix_chars) if self.prefix_aware else None
        pool = self.pool
        if not (pool.healthy("decode") or pool.healthy("both")):
            await self._wait_for_healthy("decode", "both")  # prefill is optional: decode can recompute

        if pool.healthy("prefill") and pool.healthy("decode"):
            kv, early = await self._prefill_tier(path, body, headers, key, req)
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
                early = self._prefill_failed(req, headers)
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

    async def _prefill_tier(self, path: str, body: dict, headers: dict, key: str | None, req: RequestState
                            ) -> tuple[dict | None, web.Response | None]:
        """The prefill hop under the prefill-failure policy: (kv_transfer_params, None) when a prefill worker
        produced the KV; (None, None) to recompute on the decode worker; (None, response) to answer as is (the
        prefill worker's 4xx, or the policy's 503). Each attempt goes to a prefill worker not tried yet."""
        announce = self.config.kv_announce  # stream the hop: the KV is announced before the prefill ends
        hop = {**body, "stream": announce, "max_tokens": 1,
               KV_PARAMS: {"do_remote_decode": True, **({KV_ANNOUNCE: True} if announce else {})}}
        hop.pop("stream_options", None)
        hop.pop("min_tokens", None)
        if "max_completion_tokens" in hop:
            hop["max_completion_tokens"] = 1
        data = compact_json(hop)
        tried: list[Endpoint] = []
        while candidates := self.pool.healthy("prefill", exclude=tried):
            if tried:
                if decide(self.config.prefill_failure, len(tried), other_prefill=True, headroom=True) != RETRY:
                    break
                self.metrics.retry("prefill")
            ep = self.policy["prefill"].choose(candidates, key)
            sent = time.monotonic()
            kv, early, timings = await self._prefill(ep, path, data, headers)
            if early is not None:
                return None, early
            if kv is not None:
                req.prefill_hop = Hop(sent - req.arrival, timings)
                if tried:
                    self.metrics.prefill_failure("retried_ok")
                return kv, None
            tried.append(ep)
        return None, self._prefill_failed(req, headers)

    def _prefill_failed(self, req: RequestState, headers: dict) -> web.Response | None:
        """The prefill tier failed this request (retries spent, or no healthy prefill worker): None to recompute
        on the decode worker, or the 503 + Retry-After to answer (`prefill_failure.decide`)."""
        policy = self.config.prefill_failure
        headroom = has_headroom(self.tpot_window.values(), policy.tpot_slo)
        if decide(policy, 0, other_prefill=False, headroom=headroom) == RECOMPUTE:
            self.metrics.prefill_failure("recomputed")
            log.info("prefill failed for %s; recomputing on a decode worker", headers[REQUEST_ID])
            return None
        self.metrics.prefill_failure("rejected")
        req.outcome = "rejected"
        why = ("the decode workers have no TPOT headroom to recompute the prompt" if policy.recompute != RECOMPUTE_NEVER
               else "recompute is off (prefillFailure.recompute: never)")
        log.warning("prefill failed for %s and %s: 503", headers[REQUEST_ID], why)
        return error_json(f"no prefill worker could serve this request, and {why}; retry later", status=503,
                          type="service_unavailable_error", code="prefill_unavailable",
                          headers={Header.RETRY_AFTER: str(policy.retry_after), REQUEST_ID: headers[REQUEST_ID]})

    async def _prefill(self, ep: Endpoint, path: str, data: bytes, headers: dict
                       ) -> tuple[dict | None, web.Response | None, dict[str, float]]:
        """One prefill hop: (kv_transfer_params or None when it failed, a response to return as is, the
        worker's Server-Timing)."""
        ep.acquire()
        resp: aiohttp.ClientResponse | None = None
        handed_off = False
        try:
            resp = await self._post(ep.url + path, data, headers)
            if resp.status == 200 and resp.content_type == "text/event-stream":
                timings = parse_server_timing(resp.headers.get(Header.SERVER_TIMING))
                kv = await self._announced(ep, resp)
                if kv is not None:
                    handed_off = True  # _announced's drain task closes `resp` and releases `ep`
                    return kv, None, timings
                return None, None, {}
            payload = await self._read(resp)
            status = resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
            timings = parse_server_timing(resp.headers.get(Header.SERVER_TIMING))
        except _UPSTREAM_ERRORS as exc:
            ep.mark(False, _describe(exc))
            self.metrics.hop_error("prefill", _reason(exc))
            log.warning("prefill hop to %s failed (%s)", ep.url, _describe(exc))
            return None, None, {}
        finally:
            if not handed_off:
                if resp is not None:
                    resp.close()  # a no-op after a complete body; closes (so the worker aborts) otherwise
                ep.release()
        if status == 200:
            try:
                kv = json.loads(payload).get(KV_PARAMS)
            except (ValueError, AttributeError):
                kv = None
            if isinstance(kv, dict) and kv:
                return kv, None, timings
            self.metrics.hop_error("prefill", "no_kv_transfer_params")
            log.warning("prefill worker %s returned no kv_transfer_params", ep.url)
            return None, None, {}
        if status >= 500:
            self.metrics.hop_error("prefill", str(status))
            log.warning("prefill hop to %s answered %d", ep.url, status)
            return None, None, {}
        return None, web.Response(body=payload, status=status, headers={"Content-Type": ctype,
                                                                        REQUEST_ID: headers[REQUEST_ID]}), {}

    async def _announced(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> dict | None:
        """A streamed prefill hop (`--kv-announce`): the kv_transfer_params of its announcing event, or None
        when it ended or failed without one. Once they are in, the rest of the stream is drained by a background
        task that then closes the response and releases `ep`."""
        events = SSEEvents()
        while chunk := await self._chunk(resp):
            for payload in events.feed(chunk):
                kv, error = announced_kv(payload, KV_PARAMS)
                if kv is not None:
                    task = asyncio.create_task(self._drain(ep, resp))
                    self._drains.add(task)
                    task.add_done_callback(self._drains.discard)
                    return kv
                if error is not None:
                    self.metrics.hop_error("prefill", "no_kv_transfer_params")
                    log.warning("prefill hop to %s: %s", ep.url, error)
                    return None
        self.metrics.hop_error("prefill", "no_kv_transfer_params")
        return None

    async def _drain(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> None:
        try:
            while await self._chunk(resp):
                pass
        except (*_UPSTREAM_ERRORS, asyncio.CancelledError):
            pass
        finally:
            resp.close()
            ep.release()

    async def _last_hop(self, request: web.Request, role: str, path: str, data: bytes, raw: bytes,
                        headers: dict, body: dict, key: str | None, req: RequestState, *, recompute: bool
                        ) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        tried: list[Endpoint] = []
        last: _Hop | None = None
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
            ep = self.policy[role].choose(candidates, key)
            if attempt:
                self.metrics.retry(role)
            try:
                return await self._send(request, ep, role, path, data, headers, stream, req, recompute)
            except _Hop as hop:
                last = hop
                self.metrics.hop_error(role, hop.reason)
                log.warning("%s hop to %s failed: %s", role, ep.url, hop.message)
                if not recompute and _kv_lost(role, hop.reason):
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
                    headers: dict, stream: bool, req: RequestState, recompute: bool) -> web.StreamResponse:
        """One attempt at the last hop. Raises _Hop while nothing reached the client."""
        ep.acquire()
        resp: aiohttp.ClientResponse | None = None
        try:
            sent = time.monotonic()
            try:
                resp = await self._post(ep.url + path, data, headers)
            except _UPSTREAM_ERRORS as exc:
                ep.mark(False, _describe(exc))
                raise _Hop(_reason(exc), _describe(exc)) from None
            rid = resp.headers.get(REQUEST_ID, headers[REQUEST_ID])
            req.decode_hop = Hop(sent - req.arrival, parse_server_timing(resp.headers.get(Header.SERVER_TIMING)))
            if resp.status != 200:
                try:
                    payload = await self._read(resp)
                except _UPSTREAM_ERRORS as exc:
                    ep.mark(False, _describe(exc))
                    raise _Hop(_reason(exc), _describe(exc)) from None
                return self._refused(resp, payload, rid, req)
            if not stream or not resp.content_type.startswith("text/event-stream"):
                try:
                    payload = await self._read(resp)
                except _UPSTREAM_ERRORS as exc:
                    ep.mark(False, _describe(exc))
                    raise _Hop(_reason(exc), _describe(exc)) from None
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

    async def _post(self, url: str, data: bytes, headers: dict) -> aiohttp.ClientResponse:
        """POST and wait for the response headers, at most `hop_timeout` seconds (time to first byte)."""
        limit = _limit(self.config.hop_timeout)
        try:
            async with asyncio.timeout(limit):
                return await self.session.post(url, data=data, headers=headers)
        except TimeoutError as exc:
            if limit is not None and not isinstance(exc, aiohttp.ClientError):  # ours, not aiohttp's connect
                raise HopTimeout(f"no response within {limit:g}s (--hop-timeout)") from None
            raise

    async def _chunk(self, resp: aiohttp.ClientResponse) -> bytes:
        """The next bytes of the body (b"" at its end), waiting at most `stream_idle_timeout` seconds."""
        limit = _limit(self.config.stream_idle_timeout)
        if limit is None:
            return await resp.content.readany()
        try:
            async with asyncio.timeout(limit):
                return await resp.content.readany()
        except TimeoutError as exc:
            if not isinstance(exc, aiohttp.ClientError):
                raise HopTimeout(f"no bytes for {limit:g}s (--stream-idle-timeout)") from None
            raise

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, with the idle timeout between its chunks."""
        if _limit(self.config.stream_idle_timeout) is None:
            return await resp.read()
        parts = []
        while chunk := await self._chunk(resp):
            parts.append(chunk)
        return b"".join(parts)

    def _refused(self, resp: aiohttp.ClientResponse, payload: bytes, rid: str, req: RequestState
                 ) -> web.Response:
        status = resp.status
        code = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            code = json.loads(payload)["error"].get("code")
        if status == 502 and code == "kv_transfer_failed":
            raise _Hop("kv_transfer_failed", "the KV transfer from the prefill worker failed", exclude=False)
        if status == 503:
            raise _Hop("overloaded", f"answered 503 ({code or 'unavailable'})")
        if status >= 500:
            raise _Hop(str(status), f"answered {status}: {payload[:200].decode('utf-8', 'replace')}")
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
                chunk = await self._chunk(resp)
            except _UPSTREAM_ERRORS as exc:
                failure, reason = _describe(exc), _reason(exc)
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
            ep.mark(False, failure)
            raise _Hop(reason, failure)
        log.warning("%s worker %s failed mid-stream of %s: %s", ep.role, ep.url, rid, failure)
        if reason == "timeout":
            ep.mark(False, failure)
        self.metrics.hop_error(ep.role, "timeout" if reason == "timeout" else "mid_stream")
        req.outcome = "error"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write(_sse_error(f"the {ep.role} worker failed mid-stream: {failure}", "upstream_failed"))
            await out.write_eof()
        return out

    def _first_token(self, req: RequestState, ttft: float) -> None:
        """TTFT, and its stages from the hops' Server-Timing (`stages.py`)."""
        self.metrics.ttft.observe(ttft)
        self.metrics.observe_stages(ttft_stages(ttft, req.prefill_hop, req.decode_hop))

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


def create_app(config: RouterConfig) -> web.Application:
    """The router's aiohttp app; run it with `handler_cancellation=True` (see `serve`)."""
    router = Router(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ROUTER_KEY] = router

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
    app.router.add_get("/metrics", router.metrics_handler)
    return app


async def serve(config: RouterConfig, sockets: list, stop: asyncio.Event | None = None) -> None:
    """Serve on already-bound `sockets` until `stop` is set (or forever)."""
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()
