"""The tracer of a process that traces (`tracing.create_tracer` with an endpoint): OpenTelemetry's SDK, spans
batched and sent over OTLP/HTTP (protobuf) by the SDK's exporter.

Imported only when tracing is on, so a process without an endpoint never loads OpenTelemetry. Each tracer owns
its TracerProvider instead of installing the global one: a router and workers sharing a process (`baton up`
in tests, the in-process fleets of the unit tests) keep their own `service.name`, and nothing else in the
process (vLLM's own tracer, a library's auto-instrumentation) picks up Baton's exporter by accident.

The exporter sends with its own HTTP client (`requests`, from its background thread), not the router's aiohttp
session or anything on the worker's event loop: a slow or absent collector then delays neither a request nor
the loop, and the SDK's batch processor drops spans rather than queue without bound.

W3C `traceparent` is read and written with the Trace Context propagator alone (no baggage): what vLLM's
`extract_trace_context` reads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from baton.worker.tracing import CLIENT, INTERNAL, SERVER
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from baton.launch import Header

TRACEPARENT = Header.TRACEPARENT.lower()

_KINDS = {SERVER: trace.SpanKind.SERVER, CLIENT: trace.SpanKind.CLIENT, INTERNAL: trace.SpanKind.INTERNAL}
#: how often the batch processor sends (the SDK's default is 5 s); a trace shows up within about a second
SCHEDULE_DELAY_MS = 1000


class OtelTracer:
    """Spans of one service exported to one OTLP/HTTP URL; see `tracing.Tracer` for the methods."""

    enabled = True

    def __init__(self, url: str, service: str, attributes: Mapping[str, str]) -> None:
        self.url = url
        resource = Resource.create({"service.name": service, **attributes})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=SCHEDULE_DELAY_MS))
        self._tracer = self._provider.get_tracer("baton")
        self._propagator = TraceContextTextMapPropagator()
        # monotonic -> wall-clock nanoseconds, one offset for the process's life: durations stay exactly the
        # monotonic differences the metrics are computed from
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def _ns(self, at: float | None) -> int:
        return round((time.monotonic() if at is None else at) * 1e9) + self._offset_ns

    def _context(self, parent: Any) -> otel_context.Context:
        if isinstance(parent, trace.Span):
            return trace.set_span_in_context(parent, otel_context.Context())
        if isinstance(parent, otel_context.Context):
            return parent
        return otel_context.Context()  # a new trace: never the ambient context of whoever calls

    def start(self, name: str, *, parent: Any = None, at: float | None = None, kind: str = INTERNAL,
              attributes: Mapping[str, Any] | None = None) -> trace.Span:
        return self._tracer.start_span(name, context=self._context(parent), kind=_KINDS[kind],
                                       attributes=dict(attributes or {}), start_time=self._ns(at))

    def finish(self, span: Any, *, at: float | None = None, error: str | None = None,
               attributes: Mapping[str, Any] | None = None) -> None:
        if span is None:
            return
        if attributes:
            span.set_attributes(dict(attributes))
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=self._ns(at))

    def record(self, name: str, *, parent: Any, start: float, end: float,
               attributes: Mapping[str, Any] | None = None) -> None:
        self.finish(self.start(name, parent=parent, at=start, attributes=attributes), at=end)

    def event(self, span: Any, name: str, *, at: float, attributes: Mapping[str, Any] | None = None) -> None:
        if span is not None:
            span.add_event(name, attributes=dict(attributes or {}), timestamp=self._ns(at))

    def annotate(self, span: Any, attributes: Mapping[str, Any]) -> None:
        if span is not None:
            span.set_attributes(dict(attributes))

    def extract(self, headers: Mapping[str, str]) -> otel_context.Context | None:
        """The caller's trace context from a request's `traceparent`; None without one (a new trace)."""
        value = headers.get(TRACEPARENT)
        if not value:
            return None
        ctx = self._propagator.extract({TRACEPARENT: value})
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None

    def inject(self, span: Any, headers: dict[str, str]) -> dict[str, str]:
        """`headers` plus the `traceparent` that makes `span` the parent of what the callee records."""
        if span is None:
            return headers
        out = dict(headers)
        self._propagator.inject(out, context=trace.set_span_in_context(span, otel_context.Context()))
        return out

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        return self._provider.force_flush(int(timeout_seconds * 1000))

    def shutdown(self) -> None:
        self._provider.shutdown()
