"""The router's prefill hop under the prefill-failure policy.

The hop sends the request to a prefill worker with `stream: false` (or `stream: true` with `--kv-announce`),
`max_tokens: 1` and `kv_transfer_params: {"do_remote_decode": true}` and returns the worker's
`kv_transfer_params` for the decode hop. When it fails (connection error, timeout, 5xx, or no params back) the
prefill-failure policy (`prefill_failure.py`, `--prefill-retries/--prefill-recompute/--prefill-retry-after`)
decides: another prefill worker, then the decode worker recomputing the prompt while decode has TPOT headroom,
else 503 + Retry-After. A 4xx from the prefill hop is the client's error and is returned as is. Only prefill
workers whose KV layout a healthy decode worker shares are chosen (`pairing.py`); when there is none, the
prompt is recomputed on a decode worker without a prefill hop (`baton_router_layout_mismatch_total`).

With `--kv-announce` (Baton prefill workers) the hop is streamed: the worker's first event announces the KV
(`announce.py`) while the prefill still computes, the decode hop starts on it, and the rest of the prefill
stream is drained by a background task (`stop()` cancels those).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web
from baton.worker.router.announce import SSEEvents, announced_kv
from baton.worker.router.hops import UPSTREAM_ERRORS, Upstream, describe, error_json, reason_of
from baton.worker.router.metrics import RouterMetrics
from baton.worker.router.pairing import with_partner
from baton.worker.router.policy import Policy
from baton.worker.router.pool import Endpoint, Pool
from baton.worker.router.prefill_failure import (
    RECOMPUTE,
    RETRY,
    HeadroomGate,
    PrefillFailurePolicy,
    TPOTWindow,
    decide,
)
from baton.worker.router.request import KV_PARAMS, RequestState, compact_json
from baton.worker.router.spans import start_hop
from baton.worker.router.stages import Hop
from baton.worker.tracing import NO_TRACER, Tracer

from baton.launch import KV_ANNOUNCE, RECOMPUTE_NEVER, Header, parse_server_timing

log = logging.getLogger("baton.router")

REQUEST_ID = Header.REQUEST_ID


class PrefillTier:
    """Sends prefill hops and applies the prefill-failure policy; one per router."""

    def __init__(self, pool: Pool, policy: Policy, upstream: Upstream, metrics: RouterMetrics,
                 tpot_window: TPOTWindow, failure_policy: PrefillFailurePolicy, *, announce: bool,
                 tracer: Tracer = NO_TRACER) -> None:
        self.pool = pool
        self.policy = policy
        self.upstream = upstream
        self.metrics = metrics
        self.tpot_window = tpot_window  # the `whenHeadroom` evidence
        self.headroom = HeadroomGate()  # ... read with hysteresis
        self.failure_policy = failure_policy
        self.announce = announce  # stream the hop: the KV is announced before the prefill ends
        self._drains: set[asyncio.Task] = set()  # announced prefill streams still being read to their end
        self.tracer = tracer  # a span per prefill hop (`spans.py`)

    def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()

    async def run(self, path: str, body: dict, headers: dict, key: str | None, req: RequestState
                  ) -> tuple[dict | None, web.Response | None]:
        """(kv_transfer_params, None) when a prefill worker produced the KV; (None, None) to recompute on the
        decode worker; (None, response) to answer as is (the prefill worker's 4xx, or the policy's 503). Each
        attempt goes to a prefill worker not tried yet."""
        hop = {**body, "stream": self.announce, "max_tokens": 1,
               KV_PARAMS: {"do_remote_decode": True, **({KV_ANNOUNCE: True} if self.announce else {})}}
        hop.pop("stream_options", None)
        hop.pop("min_tokens", None)
        if "max_completion_tokens" in hop:
            hop["max_completion_tokens"] = 1
        data = compact_json(hop)
        tried: list[Endpoint] = []
        while candidates := self.pool.healthy("prefill", exclude=tried):
            # only a prefill worker whose KV layout some healthy decode worker shares (pairing.py)
            candidates = with_partner(candidates, self.pool.healthy("decode"))
            if not candidates:
                if tried:  # the untried ones' KV would fit no decode worker: a prefill failure
                    break
                self.metrics.layout_mismatch.inc()
                log.info("no decode worker shares a prefill worker's KV layout; %s is recomputed on decode",
                         headers[REQUEST_ID])
                return None, None
            if tried:
                if decide(self.failure_policy, len(tried), other_prefill=True, headroom=True) != RETRY:
                    break
                self.metrics.retry("prefill")
            ep = self.policy.choose(candidates, key)
            sent = time.monotonic()
            span = start_hop(self.tracer, req, "prefill", ep.url, sent, len(tried))
            kv, early, timings = await self._hop(ep, path, data, self.tracer.inject(span, headers))
            self.tracer.finish(span, error=None if kv is not None or early is not None
                               else "no kv_transfer_params (the hop failed)")
            if early is not None:
                return None, early
            if kv is not None:
                req.prefill_hop = Hop(sent - req.arrival, timings)
                req.kv_from = ep.fingerprint
                if tried:
                    self.metrics.prefill_failure("retried_ok")
                return kv, None
            tried.append(ep)
        return None, self.failed(req, headers)

    def failed(self, req: RequestState, headers: dict) -> web.Response | None:
        """The prefill tier failed this request (retries spent, or no healthy prefill worker): None to recompute
        on the decode worker, or the 503 + Retry-After to answer (`prefill_failure.decide`)."""
        policy = self.failure_policy
        headroom = self.headroom.check(self.tpot_window.values(), policy.tpot_slo)
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

    async def _hop(self, ep: Endpoint, path: str, data: bytes, headers: dict
                   ) -> tuple[dict | None, web.Response | None, dict[str, float]]:
        """One prefill hop: (kv_transfer_params or None when it failed, a response to return as is, the
        worker's Server-Timing)."""
        ep.acquire()
        resp: aiohttp.ClientResponse | None = None
        handed_off = False
        try:
            resp = await self.upstream.post(ep.url + path, data, headers)
            if resp.status == 200 and resp.content_type == "text/event-stream":
                timings = parse_server_timing(resp.headers.get(Header.SERVER_TIMING))
                kv = await self._announced(ep, resp)
                if kv is not None:
                    handed_off = True  # _announced's drain task closes `resp` and releases `ep`
                    return kv, None, timings
                return None, None, {}
            payload = await self.upstream.read(resp)
            status = resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
            timings = parse_server_timing(resp.headers.get(Header.SERVER_TIMING))
        except UPSTREAM_ERRORS as exc:
            ep.fail(exc)
            self.metrics.hop_error("prefill", reason_of(exc))
            log.warning("prefill hop to %s failed (%s)", ep.url, describe(exc))
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
        while chunk := await self.upstream.chunk(resp):
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
            while await self.upstream.chunk(resp):
                pass
        except (*UPSTREAM_ERRORS, asyncio.CancelledError):
            pass
        finally:
            resp.close()
            ep.release()
