"""The online planner's `apply` on real nodes: a plan that changes the running layout, carried out by the real
scheduler and kubelets under load.

The operator (the chart's pod) measures the workload in a real Prometheus that scrapes the real pods (found
through the apiserver, on the port the chart's PodMonitor scrapes), plans with the shipped A100 profile (its
OPT-13B fits: these nodes have no GPUs to profile, and the Baton engine runs TP1 only, so the search has TP1),
and applies the plan. What the plan is follows from the numbers, not from the test: for tiny requests at a few
per second under the example's loose SLOs one colocated TP1 instance carries the load, so the over-provisioned
2 prefill + 2 decode fleet the test starts is laid out as a decode-only fleet of one pod (prefill 0: the
router has the decode worker compute prompts) -- the test asserts the plan status says so, then that the
Deployments follow it, the remaining pod is Ready on the decode pool, and not one request failed meanwhile.

Not shown here (no GPUs): a plan that changes tensor parallelism. The integration test
(tests/operator/test_planner_integration.py) checks that one renders `nvidia.com/gpu` = TP on the Deployments;
`tests/operator/test_planner_apply.py` the four layouts that used to leave pods unschedulable.
"""
from __future__ import annotations

import json
import sys
import time

import pytest
from baton.e2e.conftest import FLEET_NS
from baton.e2e.fixtures import PHASE_TIMINGS, REPORT_LINES, api_get, condition
from baton.e2e.processes import wait_for
from baton.e2e.test_realnodes import (
    Load,
    _fleet_manifest,
    _k,
    _pods,
    _ready,
    _router_evidence,
    cluster_ip,
    host_prometheus,
    llmservice,
    router_sees,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

NAME = "planned"


def _deployments(c) -> dict[str, dict]:
    items = api_get(f"/apis/apps/v1/namespaces/{FLEET_NS}/deployments",
                    query={"labelSelector": f"app.kubernetes.io/instance={NAME}"}, kubeconfig=c.kubeconfig)
    return {d["metadata"]["labels"]["baton.dev/role"]: d for d in items["items"]}


def _live(c, role: str) -> list[dict]:
    return [p for p in _pods(c, f"app.kubernetes.io/instance={NAME},baton.dev/role={role}", FLEET_NS)
            if not p["metadata"].get("deletionTimestamp")]


def test_planner_applies_a_plan_on_real_nodes(real_cluster, fleet_ns, tiny_model, tmp_path):
    import yaml

    c = real_cluster
    prom = host_prometheus(c, tmp_path)
    try:
        body = _fleet_manifest(c.worker_ref, tiny_model)
        body["metadata"]["name"] = NAME
        body["spec"]["prefill"]["replicas"] = 2
        body["spec"]["decode"]["replicas"] = 2
        body["spec"]["autoscaling"] = {"prometheusURL": prom.url}  # the planner measures there; no autoscaler
        body["spec"]["planner"] = {"mode": "apply", "interval": "5s", "window": "30s",
                                   "profile": "a100-80g-distserve", "profileModel": "facebook/opt-13b",
                                   "cluster": {"gpusPerNode": 2, "nodes": 2}}
        _k(c, "apply", "-f", "-", input=yaml.safe_dump(body))

        def status() -> dict:
            return (llmservice(c, NAME, FLEET_NS) or {}).get("status") or {}

        wait_for(f"LLMService {NAME} Ready, its router seeing 2 prefill and 2 decode workers",
                 lambda: status().get("phase") == "Ready" and router_sees(c, NAME, prefill=2, decode=2),
                 timeout=300, interval=2)
        router_ip = cluster_ip(c, NAME, FLEET_NS)
        t0 = time.monotonic()
        with Load(f"http://{router_ip}:80/v1", threads=2, model_dir=tiny_model) as load:
            wait_for("Prometheus to scrape the router and the workers (found through the apiserver)", lambda: bool(
                prom.query(f'baton_router_requests_total{{llmservice="{NAME}"}}')) and bool(
                prom.query(f'vllm:request_prompt_tokens_count{{llmservice="{NAME}",role="prefill"}}')),
                timeout=120, interval=2)
            s = wait_for("the planner to apply a plan", lambda: (s := status()).get("plan", {}).get("applied") and s,
                         timeout=240, interval=2)
            plan = s["plan"]
            PHASE_TIMINGS["planner: load start -> plan applied"] = time.monotonic() - t0
            basis = plan["basis"]
            # 2 paced clients: up to 4 requests/s of a few prompt tokens and 16 generated ones (the first round
            # plans on the few seconds of rate() history there are: any rate, the same plan)
            assert 0 < basis["rate"] < 8.0 and basis["inputMean"] < 64 and basis["outputMean"] <= 16, plan
            assert plan["decision"] == "PlanApplied", plan
            applied = plan["applied"]
            want = {role: applied[role]["replicas"] for role in ("prefill", "decode")}
            assert want == {"prefill": 0, "decode": 1}, plan  # one colocated TP1 instance carries it
            assert applied["locality"] == "any" and condition(s, "LayoutPlanned").get("status") == "True", s

            def settled() -> bool:
                d = _deployments(c)
                if {r: d[r]["spec"].get("replicas") for r in want} != want:
                    return False
                # the router rolled to its decode-only command line (no prefill Service) and the old one
                # drained and left: the change is over only then
                router = d["router"]
                rs = router.get("status") or {}
                rolled = (rs.get("observedGeneration") == router["metadata"]["generation"]
                          and rs.get("updatedReplicas") == rs.get("replicas") == rs.get("readyReplicas")
                          == router["spec"]["replicas"]
                          and "--prefill-service" not in router["spec"]["template"]["spec"]["containers"][0]["args"]
                          and len(_pods(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=router", FLEET_NS))
                          == router["spec"]["replicas"])
                decode = _live(c, "decode")
                return (rolled and not _live(c, "prefill") and len(decode) == 1 and _ready(decode[0])
                        and router_sees(c, NAME, prefill=0, decode=1))

            wait_for("the Deployments to follow the plan: no prefill pod, one Ready decode pod, the router rolled "
                     "to a decode-only one", settled, timeout=300, interval=2)
            PHASE_TIMINGS["planner: plan applied -> fleet settled"] = time.monotonic() - t0 - PHASE_TIMINGS[
                "planner: load start -> plan applied"]
            (pod,) = _live(c, "decode")
            node = json.loads(_k(c, "get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
            assert node["metadata"]["labels"]["baton.dev/pool"] == "decode", pod["spec"]["nodeName"]
            # the decode-only fleet answers: requests keep completing after the change
            done = load.counts()[0]
            wait_for("requests served by the decode-only fleet", lambda: load.counts()[0] >= done + 20, timeout=60)
        ok, failed = load.counts()
        spec = llmservice(c, NAME, FLEET_NS)["spec"]
        assert spec["prefill"]["replicas"] == 2 and spec["decode"]["replicas"] == 2  # the plan lives in status
        summary = (f"planner apply under load: {ok} ok ({load.empty_ok} empty, as the colocated answer), {failed} "
                   f"failed; measured {basis['rate']:.2f} req/s, plan {plan['reason']}")
        print(summary, file=sys.stderr)
        REPORT_LINES.append(summary)
        assert failed == 0, (load.failed[:5], load.failed[-1:], _router_evidence(c, NAME))
    finally:
        prom.stop()
        _k(c, "delete", "llmservice", NAME, "-n", FLEET_NS, "--wait=false", check=False)
