"""OpenTelemetry traces of the router and the Baton worker: off unless an OTLP endpoint is configured.

`create_tracer(endpoint, service)` is the one way a process gets its tracer. Without an endpoint it returns
`NO_TRACER`, whose methods do nothing and return None: no exporter, no span objects, and OpenTelemetry is not
even imported (the router runs without the worker extras; a process that does not trace pays one no-op method
call per span site). With one, `tracing_otel.OtelTracer` (the OpenTelemetry SDK, an OTLP/HTTP exporter behind a
batch processor) is imported then.

Why a facade instead of calling OpenTelemetry's API directly: the call sites pass times, not spans' own clocks.
Each span is started and ended at `time.monotonic()` instants the code already measures (a request's arrival,
when a hop was sent, the engine's queue and first-token times), the same numbers `Server-Timing` and
`baton_router_ttft_stage_seconds` are computed from, so a trace's stage durations equal the metrics' for the
same request. The tracer converts them to wall-clock nanoseconds with one offset per process.

Span names (`SpanName`) are what a trace backend shows; the README prints a tree of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from baton import launch


class SpanName:
    """Names of Baton's spans, router and worker alike."""

    ROUTER_REQUEST = "baton.router.request"  # arrival at the router -> the response's last byte
    PREFILL_HOP = "prefill_hop"  # the router's prefill hop (one per attempt)
    KV_HANDOFF = "kv_handoff"  # the decode worker pulling the KV (its Server-Timing `kv_import`), seen by the router
    DECODE_HOP = "decode_hop"  # the router's decode hop, one per attempt
    BOTH_HOP = "both_hop"  # the router's one hop to a colocated worker, one per attempt
    WORKER_REQUEST = "baton.worker.request"  # a Baton worker serving one hop
    QUEUE = "queue"  # in the engine's queue until its prefill or KV import was scheduled
    PREFILL = "prefill"  # the prompt's forward until the first token
    KV_IMPORT = "kv_import"  # the decode worker pulling the KV until the first token
    KV_EXPORT = "kv_export"  # the prefill worker shipping a KV lease to the decode worker
    DECODE = "decode"  # the first token -> the last


#: `kind` of `Tracer.start`
SERVER, CLIENT, INTERNAL = "server", "client", "internal"


class Tracer(Protocol):
    """What the router and the worker ask of a tracer. Times are `time.monotonic()` seconds; `parent` is a span
    this tracer returned or a context from `extract` (None: a new trace)."""

    enabled: bool

    def start(self, name: str, *, parent: Any = None, at: float | None = None, kind: str = INTERNAL,
              attributes: Mapping[str, Any] | None = None) -> Any: ...

    def finish(self, span: Any, *, at: float | None = None, error: str | None = None,
               attributes: Mapping[str, Any] | None = None) -> None: ...

    def record(self, name: str, *, parent: Any, start: float, end: float,
               attributes: Mapping[str, Any] | None = None) -> None: ...

    def event(self, span: Any, name: str, *, at: float, attributes: Mapping[str, Any] | None = None) -> None: ...

    def annotate(self, span: Any, attributes: Mapping[str, Any]) -> None: ...

    def extract(self, headers: Mapping[str, str]) -> Any: ...

    def inject(self, span: Any, headers: dict[str, str]) -> dict[str, str]: ...

    def flush(self, timeout_seconds: float = 10.0) -> bool: ...

    def shutdown(self) -> None: ...


class NoTracer:
    """Tracing off: every method is a no-op, `start` returns None and `inject` the headers it was given."""

    enabled = False

    def start(self, name: str, *, parent: Any = None, at: float | None = None, kind: str = INTERNAL,
              attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def finish(self, span: Any, *, at: float | None = None, error: str | None = None,
               attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def record(self, name: str, *, parent: Any, start: float, end: float,
               attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def event(self, span: Any, name: str, *, at: float, attributes: Mapping[str, Any] | None = None) -> None:
        return None

    def annotate(self, span: Any, attributes: Mapping[str, Any]) -> None:
        return None

    def extract(self, headers: Mapping[str, str]) -> None:
        return None

    def inject(self, span: Any, headers: dict[str, str]) -> dict[str, str]:
        return headers

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        return True

    def shutdown(self) -> None:
        return None


NO_TRACER = NoTracer()


def create_tracer(endpoint: str | None, service: str, attributes: Mapping[str, str] | None = None) -> Tracer:
    """The process's tracer: `NO_TRACER` without `endpoint`; else spans of `service` (OpenTelemetry's
    `service.name`, plus resource `attributes`) exported to `endpoint` over OTLP/HTTP. ValueError naming the
    flag for an endpoint that is no http(s) URL; RuntimeError when the OpenTelemetry packages are missing."""
    if not endpoint:
        return NO_TRACER
    try:
        url = launch.otlp_traces_url(endpoint)
    except ValueError as exc:
        raise ValueError(f"{launch.Flag.OTLP_TRACES_ENDPOINT}: {exc}") from None
    try:
        from baton.worker.tracing_otel import OtelTracer
    except ImportError as exc:
        raise RuntimeError(f"{launch.Flag.OTLP_TRACES_ENDPOINT} needs opentelemetry-sdk and "
                           f"opentelemetry-exporter-otlp-proto-http (pip install 'baton[worker]'): {exc}") from None
    return OtelTracer(url, service, dict(attributes or {}))


def add_tracing_flag(parser: Any) -> None:
    """`--otlp-traces-endpoint` of `baton worker` and `baton router` (argparse), spelled by the launch contract."""
    parser.add_argument(
        launch.Flag.OTLP_TRACES_ENDPOINT, default=None, metavar="URL",
        help="send OpenTelemetry traces over OTLP/HTTP to this URL (a collector's base URL gets /v1/traces); "
             "continues a caller's W3C traceparent. Default: no tracing (nothing is created or sent)")


def tracer_for(endpoint: str | None, role: str, llmservice: str | None = None,
               namespace: str | None = None) -> Tracer:
    """The tracer of a router or worker process: service `baton-<role>` (router, prefill, decode, both), with the
    LLMService and namespace as resource attributes when known."""
    attributes = {"baton.role": role}
    if llmservice:
        attributes["baton.llmservice"] = llmservice
    if namespace:
        attributes["k8s.namespace.name"] = namespace
    return create_tracer(endpoint, f"baton-{role}", attributes)
