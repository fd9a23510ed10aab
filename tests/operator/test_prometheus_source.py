"""The autoscaler's Prometheus queries against a REAL Prometheus (Debian `prometheus`, see baton.e2e.prometheus).

An exporter in this process (prometheus_client's HTTP server) serves real histograms with the router's and the
workers' names and labels; Prometheus scrapes it every second; `PrometheusSource` must read back the p90s
(Prometheus' own histogram_quantile interpolation), the in-SLO shares at the right bucket bounds, and the load
per role. Also: retries, `PrometheusUnavailable` naming the URL, refused queries.
"""
from __future__ import annotations

import asyncio
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from baton.e2e.prometheus import free_port
from baton.operator.autoscaler import prefill_capacity, role_observations
from baton.operator.prometheus import (
    LatencySignal,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusSource,
    PrometheusUnavailable,
    ServiceMetrics,
    prom_duration,
    selector,
    within_bound,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from baton.launch import TTFT_STAGES, Label, Metric

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25)
NS = "team-a"


class _TextOnly(BaseHTTPRequestHandler):
    """/metrics in the plain text format whatever the scraper asks for, as Baton's worker serves it."""

    registry: CollectorRegistry

    def do_GET(self) -> None:
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class Exporter:
    """Router and worker metrics for a few LLMServices, served over HTTP like a real /metrics.

    `negotiating=False`: the text format always (colons stay in `vllm:` names, like Baton's worker);
    True: prometheus_client's own server, which Prometheus 2.x gets OpenMetrics with `vllm_` names from.
    """

    def __init__(self, negotiating: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("baton_router_ttft_seconds", "TTFT at the router", ["llmservice", "namespace"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("baton_router_tpot_seconds", "TPOT at the router", ["llmservice", "namespace"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.stage = Histogram(Metric.ROUTER_TTFT_STAGE, "TTFT by stage at the router",
                               ["llmservice", "namespace", Label.STAGE], buckets=TTFT_BUCKETS, registry=r)
        labels = ["llmservice", "namespace", "role", "pod"]
        self.w_ttft = Histogram("vllm:time_to_first_token_seconds", "worker TTFT", labels, buckets=TTFT_BUCKETS,
                                registry=r)
        self.w_itl = Histogram("vllm:inter_token_latency_seconds", "worker ITL", labels, buckets=TPOT_BUCKETS,
                               registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "waiting", labels, registry=r)
        self.running = Gauge("vllm:num_requests_running", "running", labels, registry=r)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "kv", labels, registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "prompt tokens", labels, registry=r)
        self.busy = Counter(Metric.ENGINE_BUSY_SECONDS, "busy seconds", labels, registry=r)
        if negotiating:
            self.server, _ = start_http_server(0, addr="127.0.0.1", registry=r)
        else:
            handler = type("Handler", (_TextOnly,), {"registry": r})
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.target = f"127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporter():
    e = Exporter()
    yield e
    e.close()


@pytest.fixture
def negotiating_exporter():
    e = Exporter(negotiating=True)
    yield e
    e.close()


def observe(hist, values_counts):
    for value, count in values_counts:
        for _ in range(count):
            hist.observe(value)


@pytest.mark.integration
async def test_queries_read_back_p90_attainment_and_load(exporter, local_prometheus):
    e = exporter
    # Every series exists (at zero) before the first scrape, so rate() sees the whole increase.
    router = (e.ttft.labels("chat", NS), e.tpot.labels("chat", NS))
    wttft = e.w_ttft.labels("workers-only", NS, "prefill", "p-0")
    witl = e.w_itl.labels("workers-only", NS, "decode", "d-0")
    # The router's own series for another namespace must not leak into "chat" in NS.
    other = e.ttft.labels("chat", "team-b")
    prompt = e.prompt.labels("chat", NS, "prefill", "p-0")
    busy = [e.busy.labels("chat", NS, "prefill", f"p-{i}") for i in range(2)]
    stages = {st: e.stage.labels("chat", NS, st) for st in TTFT_STAGES[:3]}   # no first_decode samples at all
    local_prometheus.set_targets([e.target])
    local_prometheus.wait_for_targets(scrapes=1)

    # TTFT: 85 fast, 10 in (0.25, 0.5], 5 slow. p90 = 0.25 + 0.25 * (90-85)/10 = 0.375 (linear in the bucket).
    observe(router[0], [(0.04, 85), (0.3, 10), (3.0, 5)])
    # TPOT: 70 in (0.01, 0.025], 25 in (0.025, 0.05], 5 in (0.1, 0.25]. p90 = 0.025 + 0.025 * 20/25 = 0.045.
    observe(router[1], [(0.02, 70), (0.04, 25), (0.2, 5)])
    observe(other, [(4.0, 50)])
    observe(wttft, [(0.2, 50), (0.7, 50)])  # p90 = 0.5 + 0.5 * (90-50)/50 = 0.9
    observe(witl, [(0.02, 100)])  # p90 = 0.01 + 0.015 * 0.9 = 0.0235
    e.waiting.labels("chat", NS, "prefill", "p-0").set(3)
    e.waiting.labels("chat", NS, "prefill", "p-1").set(4)
    e.waiting.labels("chat", NS, "decode", "d-0").set(1)
    e.running.labels("chat", NS, "decode", "d-0").set(5)
    e.running.labels("chat", NS, "decode", "d-1").set(6)
    e.kv.labels("chat", NS, "decode", "d-0").set(0.2)
    e.kv.labels("chat", NS, "decode", "d-1").set(0.6)
    prompt.inc(600)
    busy[0].inc(6.0)  # 600 prompt tokens in 9 busy seconds: 66.7 tokens per busy second per replica
    busy[1].inc(3.0)
    queue, compute, handoff = (stages[st] for st in TTFT_STAGES[:3])
    observe(queue, [(0.04, 85), (0.3, 10), (3.0, 5)])  # p90 = 0.375, as TTFT above
    observe(compute, [(0.07, 100)])  # p90 = 0.05 + 0.05 * 0.9 = 0.095
    observe(handoff, [(0.02, 100)])  # p90 = 0.05 * 0.9 = 0.045
    local_prometheus.wait_for_targets(scrapes=2)

    async with PrometheusClient(local_prometheus.url) as client:
        source = PrometheusSource(client, window="1m")
        m = await source.observe("chat", NS, ttft_slo=0.5, tpot_slo=0.05)
        assert m.ttft.source == m.tpot.source == "router"
        assert m.ttft.p90 == pytest.approx(0.375, rel=1e-6)
        assert m.tpot.p90 == pytest.approx(0.045, rel=1e-6)
        assert (m.ttft.within_slo, m.ttft.bound) == (pytest.approx(0.95), 0.5)
        assert (m.tpot.within_slo, m.tpot.bound) == (pytest.approx(0.95), 0.05)
        assert m.attainment == pytest.approx(0.95 * 0.95)
        assert m.ttft.requests_per_second > 0 and m.window == 60.0 and m.window_text == "1m"
        assert m.roles["prefill"].waiting == 7 and m.roles["decode"].waiting == 1
        assert m.roles["decode"].running == 11
        assert m.roles["decode"].kv_cache_usage == pytest.approx(0.4)
        assert m.roles["prefill"].running is None and m.roles["prefill"].kv_cache_usage is None
        # TTFT stages: p90 per stage; a stage without samples (first_decode here) is absent, not zero
        assert m.ttft_stages == {TTFT_STAGES[0]: pytest.approx(0.375, rel=1e-6),
                                 TTFT_STAGES[1]: pytest.approx(0.095, rel=1e-6),
                                 TTFT_STAGES[2]: pytest.approx(0.045, rel=1e-6)}
        # 600 tokens over a few seconds of samples, extrapolated and divided by the 60s window.
        assert 600 / 60 <= m.roles["prefill"].prompt_tokens_per_second <= 3 * 600 / 60
        # busy time: summed for the capacity, averaged per pod for the busy share (same window, same scrapes)
        p = m.roles["prefill"]
        assert p.busy_fraction == pytest.approx(p.busy_seconds_per_second / 2, rel=0.02)  # rate() per series
        assert prefill_capacity(p) == pytest.approx(600 / 9, rel=0.02)
        assert m.roles["decode"].busy_seconds_per_second is None  # no series: no data, not zero

        # An SLO between bucket bounds counts only the requests known to meet it: bound 0.25 -> 85%.
        tighter = await source.observe("chat", NS, ttft_slo=0.4, tpot_slo=0.03)
        assert (tighter.ttft.within_slo, tighter.ttft.bound) == (pytest.approx(0.85), 0.25)
        assert (tighter.tpot.within_slo, tighter.tpot.bound) == (pytest.approx(0.70), 0.025)
        below_all = await source.observe("chat", NS, ttft_slo=0.01, tpot_slo=0.05)
        assert below_all.ttft.within_slo == 0.0 and below_all.attainment == 0.0

        # No router series: the workers' histograms stand in (TTFT from prefill, ITL from decode).
        w = await source.observe("workers-only", NS, ttft_slo=0.5, tpot_slo=0.05)
        assert w.ttft.source == w.tpot.source == "workers"
        assert w.ttft.p90 == pytest.approx(0.9, rel=1e-6)
        assert w.tpot.p90 == pytest.approx(0.0235, rel=1e-6)
        assert w.ttft.within_slo == pytest.approx(0.5) and w.tpot.within_slo == pytest.approx(1.0)

        # Nothing at all: every number is None, nothing is zero.
        none = await source.observe("absent", NS, ttft_slo=0.5, tpot_slo=0.05)
        assert none.ttft.source == "none" and none.ttft.p90 is None and none.attainment is None
        assert none.roles == {} and none.ttft_stages == {}

        assert source.queries("chat", NS)["waiting"] == (
            'sum by (role) ({__name__=~"vllm[:_]num_requests_waiting",llmservice="chat",namespace="team-a"})')


def test_stage_query_and_role_observations_pass_stages_to_prefill():
    q = PrometheusSource(None, window="1m").queries("chat", NS)["ttft_stages_p90"]   # type: ignore[arg-type]
    assert q == ('histogram_quantile(0.9, sum by (le, stage) (rate(baton_router_ttft_stage_seconds_bucket'
                 '{llmservice="chat",namespace="team-a"}[1m])))')
    metrics = ServiceMetrics(window=60.0, ttft=LatencySignal(p90=0.9),
                             ttft_stages={"prefill_queue": 0.2, "prefill_compute": 0.1, "kv_handoff": 0.4})
    deployments = {r: {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}} for r in ("prefill", "decode")}
    p = role_observations(metrics, deployments, 100.0).prefill
    assert (p.prefill_queue_p90_s, p.prefill_compute_p90_s, p.kv_handoff_p90_s, p.first_decode_p90_s) == (
        0.2, 0.1, 0.4, None)
    assert p.ttft_p90_s == 0.9
    bare = role_observations(ServiceMetrics(window=60.0), deployments, 100.0).prefill
    assert bare.prefill_queue_p90_s is None and bare.prefill_compute_p90_s is None


@pytest.mark.integration
async def test_worker_metrics_are_found_under_either_spelling(exporter, negotiating_exporter, local_prometheus):
    """prometheus_client's negotiating server hands Prometheus 2.x `vllm_...` names; Baton's worker `vllm:...`."""
    for e, name in ((exporter, "colons"), (negotiating_exporter, "underscores")):
        e.w_ttft.labels(name, NS, "prefill", "p-0")
        e.waiting.labels(name, NS, "prefill", "p-0").set(2)
    local_prometheus.set_targets([exporter.target, negotiating_exporter.target])
    local_prometheus.wait_for_targets(scrapes=1)
    for e, name in ((exporter, "colons"), (negotiating_exporter, "underscores")):
        observe(e.w_ttft.labels(name, NS, "prefill", "p-0"), [(0.2, 10)])
    local_prometheus.wait_for_targets(scrapes=2)
    stored = {r["metric"]["__name__"] for r in local_prometheus.query('{__name__=~"vllm.num_requests_waiting"}')}
    assert stored == {"vllm:num_requests_waiting", "vllm_num_requests_waiting"}
    async with PrometheusClient(local_prometheus.url) as client:
        for name in ("colons", "underscores"):
            m = await PrometheusSource(client, window="1m").observe(name, NS, 0.5, 0.05)
            assert m.roles["prefill"].waiting == 2, name
            assert m.ttft.source == "workers" and m.ttft.p90 == pytest.approx(0.1 + 0.15 * 0.9), name


@pytest.mark.integration
async def test_no_requests_in_window_reads_as_no_data(exporter, local_prometheus):
    exporter.ttft.labels("idle", NS)
    exporter.tpot.labels("idle", NS)
    local_prometheus.set_targets([exporter.target])
    local_prometheus.wait_for_targets(scrapes=2)
    async with PrometheusClient(local_prometheus.url) as client:
        m = await PrometheusSource(client, window="30s").observe("idle", NS, 0.5, 0.05)
        # histogram_quantile over all-zero rates is NaN: no p90, no share, no attainment.
        assert m.ttft.p90 is None and m.tpot.p90 is None and m.attainment is None
        assert m.ttft.source == "none"
        raw = await client.query(PrometheusSource(client, window="30s").queries("idle", NS)["ttft_router_p90"])
        assert len(raw) == 1 and math.isnan(raw[0].value)


@pytest.mark.integration
async def test_refused_query_is_a_query_error(local_prometheus):
    async with PrometheusClient(local_prometheus.url) as client:
        with pytest.raises(PrometheusQueryError) as info:
            await client.query("sum(rate(")
        assert local_prometheus.url in str(info.value) and "bad_data" in str(info.value)


async def test_unreachable_prometheus_names_the_url_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    client = PrometheusClient(url, timeout=1.0, retries=2, backoff=0.01)
    try:
        with pytest.raises(PrometheusUnavailable) as info:
            await PrometheusSource(client).observe("x", "y", 0.5, 0.05)
    finally:
        await client.aclose()
    assert info.value.url == url and url in str(info.value)
    assert "ConnectError" in str(info.value) and "after 3 attempts" in str(info.value)


async def test_transient_errors_are_retried_then_answered():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "scalar",
                                                                         "result": [1.0, "42"]}})

    async with PrometheusClient("http://prom:9090/", retries=2, backoff=0.01,
                                transport=httpx.MockTransport(handler)) as client:
        assert await client.value("42") == 42.0
    assert len(calls) == 3 and str(calls[0].url) == "http://prom:9090/api/v1/query"


async def test_timeouts_become_unavailable():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with PrometheusClient("http://prom:9090", timeout=0.5, retries=1, backoff=0.01,
                                transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(PrometheusUnavailable, match=r"no answer within 0.5s \(after 2 attempts\)"):
            await client.query("up")


def test_helpers():
    assert selector("a", "b") == 'llmservice="a",namespace="b"'
    assert selector("a", "b", role="~prefill|both") == 'llmservice="a",namespace="b",role=~"prefill|both"'
    assert selector('we"ird', "b").startswith('llmservice="we\\"ird"')
    assert [prom_duration(s) for s in (60, 90, 8, 1.5)] == ["1m", "90s", "8s", "1500ms"]
    assert within_bound({"0.1": 5, "0.5": 9, "+Inf": 10}, 0.5) == (0.9, 0.5, 10)
    assert within_bound({"0.1": 5, "0.5": 9, "+Inf": 10}, 0.3) == (0.5, 0.1, 10)
    assert within_bound({"0.1": 0, "+Inf": 0}, 0.3) == (None, None, 0)
    assert within_bound({}, 0.3) == (None, None, None)


def test_asyncio_loop_is_not_needed_for_construction():
    # The autoscaler builds its client lazily inside kopf's loop; construction must not need a running loop.
    client = PrometheusClient("http://prom:9090")
    asyncio.run(client.aclose())
