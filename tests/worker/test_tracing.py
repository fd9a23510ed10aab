"""OpenTelemetry traces across both hops, against a real OTLP/HTTP receiver (`otlp_receiver.py`: an HTTP server
decoding the protobuf it gets), with REAL prefill and decode Baton workers on the tiny model in this process and
the router's aiohttp app in a thread (helpers from test_router.py):

- one request through the router -> one trace id (the client's own traceparent, continued) across the router's,
  the prefill worker's and the decode worker's spans, in the documented tree (`-s` prints it);
- the trace's stage durations equal what `baton_router_ttft_stage_seconds` observed for that request, within
  the rounding of Server-Timing (microseconds), far below any stage;
- tracing off (the default): the worker never builds a request trace, and neither the router nor the worker
  loads the OpenTelemetry SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from baton import launch

pytest.importorskip("torch")

from baton.worker.tracing import NO_TRACER, SpanName, tracer_for

from .otlp_receiver import OTLPReceiver, ReceivedSpan, span_tree
from .test_router import SERVED, RunningRouter, RunningServer, make_engine, settled, wait_idle

STAGE = launch.Metric.ROUTER_TTFT_STAGE
#: Server-Timing carries milliseconds with 3 decimals: each reported duration is rounded to 0.5 us, and the
#: router's own times are exact. A wrong span boundary (the worker's HTTP arrival for the engine's, a hop's
#: response for its send, a span that ends at another instant than the first token) is off by far more.
TOLERANCE = 5e-6
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-tracing"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def receiver():
    r = OTLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced_workers(model, receiver):
    """A prefill and a decode worker that trace to `receiver` (a collector's base URL: /v1/traces is added)."""
    from baton.worker.server import create_app

    running: dict[str, RunningServer] = {}
    try:
        for role in ("prefill", "decode"):
            engine = make_engine(model, role=role)
            tracer = tracer_for(receiver.base_url, role)
            srv = RunningServer(create_app(engine, served_model_name=SERVED, tracer=tracer), engine)
            srv.start()
            srv.tracer = tracer
            running[role] = srv
        yield running
    finally:
        for srv in running.values():
            srv.stop()


def _one(spans: list[ReceivedSpan], name: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, f"{name} of {service}: {found}"
    return found[0]


def _complete(spans: list[ReceivedSpan]) -> bool:
    names = {(s.service, s.name) for s in spans}
    return {("baton-router", SpanName.ROUTER_REQUEST), ("baton-prefill", SpanName.KV_EXPORT),
            ("baton-decode", SpanName.DECODE)} <= names


def test_one_request_is_one_trace_whose_stages_match_the_router_metrics(traced_workers, receiver):
    r = RunningRouter(prefill=[traced_workers["prefill"].base_url], decode=[traced_workers["decode"].base_url],
                      otlp_traces_endpoint=receiver.base_url).start()
    try:
        body = {"model": SERVED, "prompt": "Where do the rivers go?", "max_tokens": 6, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", r.base_url + "/v1/completions", json=body, timeout=60,
                          headers={"traceparent": CLIENT_TRACEPARENT}) as resp:
            assert resp.status_code == 200
            assert b"[DONE]" in resp.read()
        m = settled(r)
        for tracer in (r.router.tracer, traced_workers["prefill"].tracer, traced_workers["decode"].tracer):
            assert tracer.flush(10)
        spans = receiver.wait_for(_complete)
    finally:
        r.stop()
    print("\n" + span_tree(spans))

    # one trace: the client's, continued by the router, both workers and the KV export
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    root = _one(spans, SpanName.ROUTER_REQUEST, "baton-router")
    prefill_hop = _one(spans, SpanName.PREFILL_HOP, "baton-router")
    decode_hop = _one(spans, SpanName.DECODE_HOP, "baton-router")
    handoff = _one(spans, SpanName.KV_HANDOFF, "baton-router")
    p_req = _one(spans, SpanName.WORKER_REQUEST, "baton-prefill")
    d_req = _one(spans, SpanName.WORKER_REQUEST, "baton-decode")
    p = {n: _one(spans, n, "baton-prefill") for n in (SpanName.QUEUE, SpanName.PREFILL, SpanName.KV_EXPORT)}
    d = {n: _one(spans, n, "baton-decode") for n in (SpanName.QUEUE, SpanName.KV_IMPORT, SpanName.DECODE)}
    assert root.parent_id == CLIENT_TRACEPARENT.split("-")[2]
    assert {prefill_hop.parent_id, decode_hop.parent_id, handoff.parent_id} == {root.span_id}
    assert p_req.parent_id == prefill_hop.span_id and d_req.parent_id == decode_hop.span_id  # via traceparent
    assert {s.parent_id for s in p.values()} == {p_req.span_id}
    assert {s.parent_id for s in d.values()} == {d_req.span_id}
    assert not any(s.error for s in spans)
    assert root.attributes["baton.outcome"] == "ok" and p_req.attributes["baton.role"] == "prefill"

    # the stages, from the spans alone, against the router's histogram of this one request
    def observed(stage: str) -> float:
        assert m[(f"{STAGE}_count", (("stage", stage),))] == 1
        return m[(f"{STAGE}_sum", (("stage", stage),))]

    ttft = (root.events["first_token"] - root.start_ns) / 1e9
    traced = {
        "prefill_queue": (prefill_hop.start_ns - root.start_ns) / 1e9 + p[SpanName.QUEUE].seconds,
        "prefill_compute": p[SpanName.PREFILL].seconds,
        "kv_handoff": d[SpanName.KV_IMPORT].seconds,
    }
    traced["first_decode"] = ttft - sum(traced.values())
    metrics = {stage: observed(stage) for stage in launch.TTFT_STAGES}
    print("stage            trace (ms)   metric (ms)")
    for stage in launch.TTFT_STAGES:
        print(f"{stage:<16} {traced[stage] * 1000:10.4f}   {metrics[stage] * 1000:10.4f}")
    assert ttft == pytest.approx(m[("baton_router_ttft_seconds_sum", ())], abs=TOLERANCE)
    for stage in launch.TTFT_STAGES:
        assert traced[stage] == pytest.approx(metrics[stage], abs=TOLERANCE), stage
        assert metrics[stage] > 20 * TOLERANCE, (stage, metrics[stage])  # the tolerance is no stage's size
    assert handoff.seconds == pytest.approx(metrics["kv_handoff"], abs=TOLERANCE)
    assert root.attributes["baton.ttft_stage.prefill_compute"] == metrics["prefill_compute"]
    # the KV export happened while the decode worker imported it, after the prefill hop's answer
    assert p[SpanName.KV_EXPORT].start_ns >= p[SpanName.PREFILL].end_ns
    wait_idle(traced_workers["decode"].engine)


def test_tracing_off_builds_no_trace(model, monkeypatch):
    """No endpoint: the worker serves a request without ever constructing a request trace, the router's
    tracer is the no-op one and its request state carries no span."""
    import baton.worker.server as server_mod
    from baton.worker.server import create_app

    def refuse(*a, **kw):
        raise AssertionError("a request trace was built with tracing off")

    monkeypatch.setattr(server_mod, "RequestTrace", refuse)
    engine = make_engine(model, role="both")
    srv = RunningServer(create_app(engine, served_model_name=SERVED), engine)
    srv.start()
    r = RunningRouter(both=[srv.base_url]).start()
    try:
        assert r.router.tracer is NO_TRACER and r.router.prefill_tier.tracer is NO_TRACER
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "hi", "max_tokens": 3},
                          headers={"traceparent": CLIENT_TRACEPARENT}, timeout=60)
        assert resp.status_code == 200
    finally:
        r.stop()
        srv.stop()


def test_tracing_off_never_loads_the_sdk():
    """A router and a worker app built without an endpoint (a fresh interpreter) import no OpenTelemetry SDK or
    exporter module: nothing is created and nothing is sent."""
    code = r"""
import json, sys
from baton.worker.router.app import RouterConfig, create_app
from baton.worker.server import create_app as worker_app
create_app(RouterConfig(both=["http://127.0.0.1:9"]))
class Engine:
    role = "prefill"; model_name = "m"; stats = staticmethod(lambda: None)
    def on_kv_exported(self, cb): raise AssertionError("hooked with tracing off")
worker_app(Engine(), served_model_name="m", manage_engine=False)
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_bad_endpoint_names_the_flag():
    from baton.worker.router.cli import build_config
    from baton.worker.tracing import create_tracer

    from baton.cli import CommandError, build_parser

    assert create_tracer(None, "router") is NO_TRACER and create_tracer("", "router") is NO_TRACER
    with pytest.raises(ValueError, match="--otlp-traces-endpoint: .*http:// or https://"):
        create_tracer("collector:4318", "router")
    args = build_parser().parse_args(["router", "--both", "http://127.0.0.1:9", "--otlp-traces-endpoint", "c:4318"])
    with pytest.raises(CommandError, match="--otlp-traces-endpoint: .*http:// or https://"):
        build_config(args)
