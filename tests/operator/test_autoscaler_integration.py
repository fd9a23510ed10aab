"""The SLO autoscaler end to end: `baton operator run` against the real local control plane, a real Prometheus
scraping an exporter that plays the router (real `baton_router_ttft_seconds` / `baton_router_tpot_seconds`
histograms for the LLMService), and load steps:

1. TTFT p90 above the SLO, TPOT fine -> the prefill Deployment scales up, decode stays put.
2. TPOT p90 above the SLO, TTFT fine -> decode scales up, prefill stays put.
3. Prometheus killed -> replicas held; `SLOMet` is Unknown with reason `PrometheusUnreachable`; one Warning.

Status (`slo`, `lastScaleReason`), Events and the operator's own metrics endpoint say why.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest

pytestmark = pytest.mark.integration

from baton.e2e.fixtures import api_get, condition, get_llmservice
from baton.e2e.processes import OperatorProcess as Operator
from baton.e2e.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-local.yaml"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
INTERVAL = 2.0


class RouterLoad:
    """Plays the router of one LLMService: ~40 requests/s with settable TTFT and TPOT, plus worker gauges."""

    def __init__(self, name: str, namespace: str) -> None:
        r = self.registry = CollectorRegistry()
        labels = {"llmservice": name, "namespace": namespace}
        self.ttft_hist = Histogram("baton_router_ttft_seconds", "TTFT", list(labels), buckets=TTFT_BUCKETS,
                                   registry=r).labels(**labels)
        self.tpot_hist = Histogram("baton_router_tpot_seconds", "TPOT", list(labels), buckets=TPOT_BUCKETS,
                                   registry=r).labels(**labels)
        kv = Gauge("vllm:kv_cache_usage_perc", "KV", [*labels, "role"], registry=r)
        kv.labels(**labels, role="decode").set(0.2)
        running = Gauge("vllm:num_requests_running", "running", [*labels, "role"], registry=r)
        running.labels(**labels, role="decode").set(2)
        self.ttft, self.tpot = 0.08, 0.02
        self._stop = threading.Event()
        registry = r

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.target = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._traffic, daemon=True).start()

    def _traffic(self) -> None:
        while not self._stop.wait(0.025):
            self.ttft_hist.observe(self.ttft)
            self.tpot_hist.observe(self.tpot)

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_slo_autoscaler_scales_the_violating_role_and_holds_without_prometheus(
        local_cluster, kubeconfig, kubectl, llmservice_crd, namespace, local_prometheus, tmp_path):
    body = yaml.safe_load(EXAMPLE.read_text())
    name = body["metadata"]["name"]
    body["metadata"]["namespace"] = namespace
    spec = body["spec"]
    spec["slo"] = {"ttft": "500ms", "tpot": "50ms", "attainment": 0.9}
    for role in ("prefill", "decode"):
        spec[role]["replicas"] = 1
        spec[role]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4}
        spec[role]["resources"] = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    spec["autoscaling"] = {"enabled": True, "prometheusURL": local_prometheus.url, "interval": f"{INTERVAL:g}s",
                           "scaleUpStabilization": "0s", "scaleDownStabilization": "10m"}

    load = RouterLoad(name, namespace)
    local_prometheus.set_targets([load.target])
    op = Operator(str(kubeconfig), tmp_path / "operator.log", metrics=True,
                  extra_args=("--autoscaler-window", "10s"))
    op.start()
    try:
        local_prometheus.wait_for_targets(scrapes=1)

        op.wait_webhook_registered()
        kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)

        # (read in-process, `api_get`: what the waits poll)
        def status() -> dict:
            return get_llmservice(name, namespace).get("status") or {}

        def replicas() -> dict[str, int]:
            items = api_get(f"/apis/apps/v1/namespaces/{namespace}/deployments",
                            query={"labelSelector": f"app.kubernetes.io/instance={name}"})
            return {d["metadata"]["labels"]["baton.dev/role"]: d["spec"]["replicas"] for d in items["items"]}

        def events(reason: str) -> list[dict]:
            items = api_get(f"/api/v1/namespaces/{namespace}/events", query={
                "fieldSelector": f"involvedObject.kind=LLMService,involvedObject.name={name}"})["items"]
            return [e for e in items if e["reason"] == reason]

        # Baseline: within SLO, status.slo filled in, nothing scales.
        s = wait_for("SLOMet True with measured p90s", lambda: (s := status()) and
                     condition(s, "SLOMet").get("status") == "True" and s, timeout=60, diagnostics=op.log_tail)
        assert condition(s, "SLOMet")["reason"] == "WithinSLO"
        assert s["slo"]["window"] == "10s" and s["slo"]["ttftP90"].endswith("ms") and s["slo"]["attainment"] >= 0.9
        assert replicas() == {"prefill": 1, "decode": 1, "router": 1}

        # 1. TTFT step: prefill up, decode stays.
        load.ttft = 1.2
        wait_for("prefill to scale up", lambda: replicas()["prefill"] > 1, timeout=40, diagnostics=op.log_tail)
        assert replicas()["decode"] == 1
        s = wait_for("status.prefill.lastScaleReason", lambda: (s := status()).get("prefill", {})
                     .get("lastScaleReason") and s, timeout=10)
        assert s["prefill"]["lastScaleReason"] == "TTFTAboveSLO", s
        assert s["prefill"]["desiredReplicas"] == replicas()["prefill"] and s["prefill"]["lastScaleTime"]
        assert condition(s, "SLOMet")["status"] == "False" and "TTFT" in condition(s, "SLOMet")["reason"], s
        up = events("ScaledUp")
        assert up and "prefill 1 -> " in up[0]["message"] and "TTFTAboveSLO" in up[0]["message"], up
        assert "decode" not in s or "lastScaleReason" not in s["decode"], s
        prefill_after = replicas()["prefill"]

        # 2. TPOT step: decode up, prefill stays (TTFT recovered; prefill warms up and never scales down here).
        load.ttft, load.tpot = 0.08, 0.12
        wait_for("decode to scale up", lambda: replicas()["decode"] > 1, timeout=40, diagnostics=op.log_tail)
        assert replicas()["prefill"] == prefill_after
        s = wait_for("status.decode.lastScaleReason", lambda: (s := status()).get("decode", {})
                     .get("lastScaleReason") and s, timeout=10)
        assert s["decode"]["lastScaleReason"] == "TPOTAboveSLO", s
        assert s["prefill"]["lastScaleReason"] == "TTFTAboveSLO", s
        assert any("decode 1 -> " in e["message"] and "TPOTAboveSLO" in e["message"] for e in events("ScaledUp"))
        metrics = op.metrics()
        assert (f'baton_autoscaler_desired_replicas{{llmservice="{name}",namespace="{namespace}",role="decode"}} '
                f'{float(replicas()["decode"])}') in metrics, metrics
        assert 'reason="TPOTAboveSLO"' in metrics and "baton_autoscaler_decisions_total{" in metrics

        # 3. Prometheus gone: replicas held, SLOMet Unknown / PrometheusUnreachable, one Warning Event.
        held = replicas()
        local_prometheus.kill()
        load.tpot = 0.3  # would call for more decode if anyone could see it
        s = wait_for("SLOMet Unknown/PrometheusUnreachable", lambda: (s := status()) and
                     condition(s, "SLOMet").get("reason") == "PrometheusUnreachable" and s, timeout=30,
                     diagnostics=op.log_tail)
        assert condition(s, "SLOMet")["status"] == "Unknown"
        assert local_prometheus.url in condition(s, "SLOMet")["message"]
        time.sleep(3 * INTERVAL)
        assert replicas() == held
        warnings = [e for e in events("PrometheusUnreachable") if e["type"] == "Warning"]
        assert len(warnings) == 1 and sum(e.get("count", 1) for e in warnings) == 1, warnings
        assert s.get("slo", {}).get("ttftP90") is None and s["slo"]["window"] == "10s", s
    finally:
        op.stop()
        load.close()
