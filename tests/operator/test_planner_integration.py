"""The online planner end to end: `baton operator run` against the real local control plane, a real Prometheus
scraping an exporter that plays the fleet with the data plane's own metric objects (the router's
`RouterMetrics`, a prefill and a decode `WorkerMetrics`, fed ShareGPT-like requests at a steady rate):

1. `planner.mode: recommend`: `status.plan` appears with the measured workload basis, the per-phase layout
   and predicted goodput; the `LayoutPlanned` condition says the running layout differs; a `PlanRecommended`
   Event; the Deployments are left alone.
2. Switched to `apply`: the plan is applied (the running 1+1 TP1 layout cannot carry the load), the
   Deployments follow it (tensor parallelism in the GPU request, replicas, locality affinity), the condition
   turns True, a `PlanApplied` Event.
3. The same load keeps the plan (hysteresis): no new plan is written while the basis stays in the band.
"""
from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

from baton.e2e.fixtures import api_get, condition, get_json, get_llmservice
from baton.e2e.processes import OperatorProcess as Operator
from baton.e2e.processes import wait_for
from baton.worker.engine.types import EngineStats
from baton.worker.metrics import WorkerMetrics
from baton.worker.router.metrics import RouterMetrics

from baton.workload import SHAREGPT_LIKE

REPO = Path(__file__).resolve().parents[2]
RATE = 6.0  # req/s: more than one TP1 prefill instance of OPT-13B carries within a 200 ms TTFT


class FleetLoad:
    """Plays a fleet: every request is counted by the router and by a prefill and a decode worker."""

    def __init__(self, name: str, namespace: str) -> None:
        labels = {"llmservice": name, "namespace": namespace}
        self.router = RouterMetrics(name, namespace)
        stats = EngineStats()
        self.prefill = WorkerMetrics(model_name="opt", role="prefill", stats=lambda: stats, labels=labels)
        self.decode = WorkerMetrics(model_name="opt", role="decode", stats=lambda: stats, labels=labels)
        self.rng = random.Random(0)
        self._stop = threading.Event()
        # one /metrics endpoint per process, as Prometheus sees a real fleet
        self.servers = [_serve(m.render) for m in (self.router, self.prefill, self.decode)]
        self.targets = [f"127.0.0.1:{s.server_port}" for s in self.servers]
        threading.Thread(target=self._traffic, daemon=True).start()

    def _traffic(self) -> None:
        while not self._stop.wait(self.rng.expovariate(RATE)):
            n_in, n_out = SHAREGPT_LIKE.prompt.sample(self.rng), SHAREGPT_LIKE.output.sample(self.rng)
            self.router.ttft.observe(0.1)
            self.router.tpot.observe(0.05)
            p = self.prefill.tracker()
            p.on_output(1, n_in)
            p.on_finish("length")
            d = self.decode.tracker()
            d.on_output(n_out, n_in)
            d.on_finish("length")

    def close(self) -> None:
        self._stop.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _serve(render) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_planner_recommends_then_applies(local_cluster, kubeconfig, kubectl, llmservice_crd, namespace,
                                         local_prometheus,
                                         tmp_path):
    name = "opt"
    body = {
        "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "opt-13b", "source": {"hostPath": {"path": "/models/opt-13b"}}},
            "engine": {"kind": "vllm", "image": "vllm/vllm-openai:v0.10.1"},
            "slo": {"ttft": "200ms", "tpot": "100ms", "attainment": 0.9},
            "prefill": {"replicas": 1, "tensorParallel": 1},
            "decode": {"replicas": 1, "tensorParallel": 1},
            "autoscaling": {"prometheusURL": local_prometheus.url},
            "planner": {"mode": "recommend", "interval": "3s", "window": "20s", "profileModel": "facebook/opt-13b",
                        "cluster": {"gpusPerNode": 4, "nodes": 2}},
        },
    }
    load = FleetLoad(name, namespace)
    local_prometheus.set_targets(load.targets)
    op = Operator(str(kubeconfig), tmp_path / "operator.log", metrics=False)
    op.start()
    try:
        local_prometheus.wait_for_targets(scrapes=1)
        time.sleep(20)  # a full planner window of rate() history

        # (read in-process, `api_get`: what the waits poll)
        def status() -> dict:
            return get_llmservice(name, namespace).get("status") or {}

        def deployments() -> dict[str, dict]:
            items = api_get(f"/apis/apps/v1/namespaces/{namespace}/deployments",
                            query={"labelSelector": f"app.kubernetes.io/instance={name}"})
            return {d["metadata"]["labels"]["baton.dev/role"]: d for d in items["items"]}

        def layout() -> dict[str, tuple[int, str]]:
            out = {}
            for role in ("prefill", "decode"):
                d = deployments()[role]
                gpus = d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                out[role] = (d["spec"]["replicas"], str(gpus))
            return out

        def events(reason: str) -> list[dict]:
            items = api_get(f"/api/v1/namespaces/{namespace}/events", query={
                "fieldSelector": f"involvedObject.kind=LLMService,involvedObject.name={name}"})["items"]
            return [e for e in items if e["reason"] == reason]

        def create() -> bool:
            out = kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
            assert "denied" not in out.stderr, out.stderr  # refused by validation: fail now, not after a minute
            return out.returncode == 0

        wait_for("the operator to take the LLMService", create, timeout=60, diagnostics=op.log_tail)

        # 1. recommend: status.plan with the measured basis; the Deployments stay as written
        s = wait_for("status.plan", lambda: (s := status()).get("plan", {}).get("prefill") and s, timeout=90,
                     diagnostics=op.log_tail)
        plan = s["plan"]
        basis = plan["basis"]
        assert basis["rate"] == pytest.approx(RATE, rel=0.35), plan
        assert basis["inputMean"] == pytest.approx(SHAREGPT_LIKE.prompt.mean, rel=0.3), plan
        assert plan["capacityRPS"] >= basis["rate"] and plan["goodputPerGPU"] > 0 and plan["reason"], plan
        assert plan.get("applied") is None and plan["decision"] == "PlanRecommended", plan
        c = condition(s, "LayoutPlanned")
        assert c["status"] == "False" and c["reason"] == "PlanRecommended", c
        assert wait_for("a PlanRecommended Event", lambda: events("PlanRecommended"), timeout=20)
        assert layout() == {"prefill": (1, "1"), "decode": (1, "1")}
        first_time = plan["time"]

        # 2. apply: the Deployments follow the plan
        kubectl("patch", "llmservice", name, "-n", namespace, "--type", "merge", "-p",
                json.dumps({"spec": {"planner": {"mode": "apply"}}}), check=True)
        s = wait_for("the plan applied", lambda: (s := status()).get("plan", {}).get("applied") and s, timeout=60,
                     diagnostics=op.log_tail)
        plan = s["plan"]
        applied = plan["applied"]
        assert all(applied[r] == plan[r] for r in ("prefill", "decode")) and applied["locality"] == plan["locality"]
        want = {role: (plan[role]["replicas"], str(plan[role]["tensorParallel"])) for role in ("prefill", "decode")}
        assert want != {"prefill": (1, "1"), "decode": (1, "1")}, plan
        wait_for(f"Deployments at {want}", lambda: layout() == want, timeout=60, diagnostics=op.log_tail)
        prefill = deployments()["prefill"]["spec"]["template"]["spec"]
        if plan["locality"] == "node":
            assert "podAffinity" in prefill.get("affinity", {}), prefill.get("affinity")
        assert wait_for("a PlanApplied Event", lambda: events("PlanApplied"), timeout=20)
        s = wait_for("LayoutPlanned True", lambda: (s := status()) and
                     condition(s, "LayoutPlanned").get("status") == "True" and s, timeout=30)
        # the user's spec is untouched: the plan lives in status
        spec = get_json(kubectl, "llmservice", name, "-n", namespace)["spec"]
        assert spec["prefill"]["tensorParallel"] == 1 and spec["decode"]["replicas"] == 1

        # 3. hysteresis: the same load keeps the plan (no new plan for several rounds)
        applied_time = s["plan"]["time"]
        assert applied_time >= first_time
        time.sleep(12)
        assert status()["plan"]["time"] == applied_time
        assert layout() == want
    finally:
        op.stop()
        load.close()
