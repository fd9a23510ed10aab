"""The router's spans of one request (OpenTelemetry through `baton.worker.tracing`; nothing when tracing is off):

    baton.router.request      arrival -> the handler's end (continues a client's W3C traceparent when it sends one)
      prefill_hop             one per attempt: sent -> the worker's kv_transfer_params (or the failure)
      kv_handoff              the decode worker pulling the KV: its Server-Timing `kv_import`, after its `queue`
      decode_hop              one per attempt: sent -> the last byte (`both_hop` to a colocated worker)

Each hop's span travels to the worker as `traceparent`, so the worker's own spans (Baton's `request_trace.py`,
vLLM's) hang below the hop that called it. The root carries what the metrics observed for this request: its
TTFT (`baton.ttft_seconds`, and a `first_token` event) and its stages (`baton.ttft_stage.<stage>`, the values of
`baton_router_ttft_stage_seconds`), so a slow request found in a trace backend is explained the way the
dashboard explains the fleet. Times are the router's own `time.monotonic()` values the stages come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from baton.worker.router.request import RequestState
from baton.worker.tracing import CLIENT, SERVER, SpanName, Tracer

from baton.launch import Timing

HOP_SPANS = {"prefill": SpanName.PREFILL_HOP, "decode": SpanName.DECODE_HOP, "both": SpanName.BOTH_HOP}
#: outcomes (`baton_router_requests_total{outcome}`) that mark the root span as an error
FAILED_OUTCOMES = ("error", "rejected", "overloaded")


def start_request(tracer: Tracer, req: RequestState, headers: Mapping[str, str], path: str) -> None:
    if not tracer.enabled:
        return  # tracing off: `req.span` stays None, and every other function here returns at once
    req.span = tracer.start(SpanName.ROUTER_REQUEST, parent=tracer.extract(headers), at=req.arrival, kind=SERVER,
                            attributes={"http.route": path})


def end_request(tracer: Tracer, req: RequestState) -> None:
    if req.span is None:
        return
    attributes: dict[str, Any] = {"baton.outcome": req.outcome}
    if req.request_id:
        attributes["baton.request_id"] = req.request_id
    tracer.finish(req.span, error=req.outcome if req.outcome in FAILED_OUTCOMES else None, attributes=attributes)


def start_hop(tracer: Tracer, req: RequestState, role: str, url: str, sent: float, attempt: int) -> Any:
    """A hop's span (None when tracing is off); `tracer.inject(span, headers)` gives the hop its traceparent."""
    if req.span is None:
        return None
    return tracer.start(HOP_SPANS[role], parent=req.span, at=sent, kind=CLIENT,
                        attributes={"baton.worker": url, "baton.attempt": attempt})


def first_token(tracer: Tracer, req: RequestState, ttft: float, stages: dict[str, float]) -> None:
    """The TTFT and its stages on the root span, and the `kv_handoff` span when the KV came from a prefill
    worker and the decode worker reported its pull (placed at the decode hop's send + the worker's queue)."""
    if req.span is None:
        return
    tracer.event(req.span, "first_token", at=req.arrival + ttft)
    tracer.annotate(req.span, {"baton.ttft_seconds": ttft,
                               **{f"baton.ttft_stage.{stage}": seconds for stage, seconds in stages.items()}})
    decode = req.decode_hop
    if req.prefill_hop is None or decode is None or Timing.KV_IMPORT not in decode.timings:
        return
    start = req.arrival + decode.sent + decode.timings.get(Timing.QUEUE, 0.0)
    tracer.record(SpanName.KV_HANDOFF, parent=req.span, start=start, end=start + decode.timings[Timing.KV_IMPORT],
                  attributes={"baton.source": "decode worker Server-Timing kv_import"})
