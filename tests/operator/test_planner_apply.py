"""`spec.planner.mode: apply` renders a layout that can run (issue 20): GPUs follow a plan's tensor parallelism,
the search offers only degrees the webhook admits, node locality only where the pools share a node, a colocated
plan is a colocated service, and a plan whose laid-over service fails admission is reported, never applied."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
from baton.operator import admission
from baton.operator.planner import SLO, Cluster, plan
from baton.operator.planner.admissible import (
    layout_problems,
    role_tensor_parallel_problem,
    tensor_parallel_rule,
)
from baton.operator.planner.online import decide
from baton.operator.planner.overlay import effective
from baton.operator.planner.report import format_plan, spec_fragment, to_status
from baton.operator.render import render

from baton.profile import ModelProfiles, ProfileSet
from baton.workload import SHAREGPT_LIKE, LengthDist, Workload
from tests.operator.test_planner import _Kube, _Source, _State, flat, svc_dict

IMAGE = "vllm/vllm-openai:v0.10.1"
GPU = "nvidia.com/gpu"


def vllm_service(applied: dict | None = None, **spec) -> dict:
    """test_planner's service as the webhook admits it in apply mode: vLLM with an image, Prometheus set."""
    body = svc_dict(plan={"applied": applied} if applied else None)
    body["spec"]["engine"] = {"kind": "vllm", "image": IMAGE}
    body["spec"]["autoscaling"] = {"prometheusURL": "http://p:9090"}
    body["spec"].update(spec)
    return body


def layout(prefill: tuple[int, int], decode: tuple[int, int], locality: str = "any") -> dict:
    """`status.plan.applied` from (tensorParallel, replicas) per role."""
    return {"prefill": {"tensorParallel": prefill[0], "replicas": prefill[1]},
            "decode": {"tensorParallel": decode[0], "replicas": decode[1]}, "locality": locality}


def deployments(body: dict) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in render(body) if m["kind"] == "Deployment"}


def resources(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]["resources"]


def required_affinity(dep: dict) -> list:
    affinity = dep["spec"]["template"]["spec"].get("affinity") or {}
    return (affinity.get("podAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []


# ------------------------------------------------------------------------------------------ 1. GPUs follow TP


def test_a_plan_that_changes_tensor_parallel_brings_the_gpus_along():
    body = vllm_service(layout((2, 1), (1, 2)), accelerator="gpu")
    body["spec"]["prefill"]["resources"] = {"limits": {GPU: 1, "cpu": "4", "memory": "16Gi"},
                                            "requests": {GPU: "1", "cpu": "2"}}
    # decode's user gave a TP2 worker 4 GPUs: the plan's TP1 keeps that margin (4 x 1/2)
    body["spec"]["decode"].update(tensorParallel=2, resources={"limits": {GPU: "4"}})
    assert admission.review(effective(body)) == []  # the one validation path: what the webhook says
    deps = deployments(body)  # refused before: limits[nvidia.com/gpu] must be at least tensorParallel (2)
    prefill = resources(deps["s-prefill"])
    assert prefill["limits"] == {GPU: "2", "cpu": "4", "memory": "16Gi"}  # CPU/memory as written
    assert prefill["requests"] == {GPU: "2", "cpu": "2"}
    assert resources(deps["s-decode"])["limits"] == {GPU: "2"}
    # the user's spec is not modified, and a TP the plan leaves alone keeps the user's GPUs
    assert body["spec"]["prefill"]["resources"]["limits"][GPU] == 1
    same = vllm_service(layout((1, 3), (1, 2)), accelerator="gpu")
    same["spec"]["prefill"]["resources"] = {"limits": {GPU: "2"}}
    assert resources(deployments(same)["s-prefill"])["limits"] == {GPU: "2"}


# ------------------------------------------------------------------------------------------ 2. admitted TPs only


def test_the_search_offers_only_tensor_parallel_degrees_the_webhook_admits():
    # OPT-66B's profiles have TP3 fits; the API wants powers of two, so TP3 is never offered
    mp = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-66b")
    assert 3 in mp.tensor_parallel_degrees
    w = Workload(4.0, SHAREGPT_LIKE.prompt, SHAREGPT_LIKE.output)
    p = plan(mp, w, SLO(1.0, 0.2, 0.9), Cluster(gpus_per_node=8, nodes=2), num_requests=200, check=False)
    assert p.candidates and all(3 not in d for d in p.instance_rps.values())
    assert {c.prefill_tp for c in p.candidates} | {c.decode_tp for c in p.candidates} <= {2, 4, 8}
    note = "TP3 not searched: tensorParallel: must be a power of two (1, 2, 4, ...), got 3"
    assert note in p.notes and note in format_plan(p)
    # every layout offered is one the webhook admits, laid over a vLLM service
    for c in p.candidates:
        lay = layout((c.prefill_tp, c.prefill_replicas if c.kind != "colocated" else 0),
                     (c.decode_tp, c.decode_replicas), p.locality)
        assert layout_problems(vllm_service(accelerator="gpu"), lay) == [], c.describe()
    assert role_tensor_parallel_problem(3) and role_tensor_parallel_problem(128) and not role_tensor_parallel_problem(8)


def test_the_service_decides_which_degrees_the_search_offers():
    vllm = tensor_parallel_rule(vllm_service())
    assert vllm(1) is None and vllm(2) is None and vllm(8) is None
    assert "spec.prefill.tensorParallel: must be a power of two" in vllm(3)
    # a user GPU limit does not shut TP2 out: the GPUs follow the plan's TP
    limited = vllm_service(accelerator="gpu")
    limited["spec"]["prefill"]["resources"] = {"limits": {GPU: "1"}}
    assert tensor_parallel_rule(limited)(2) is None
    # the Baton engine runs one device per worker: the webhook's rule, reached through the same review
    baton = svc_dict()
    baton["spec"]["autoscaling"] = {"prometheusURL": "http://p:9090"}
    rule = tensor_parallel_rule(baton)
    assert rule(1) is None and "the Baton engine runs on one device" in rule(2)
    # the model: TP must divide its attention heads, when known
    prof = ModelProfiles("m", {tp: flat(prefill_ms=20, kv=50_000, limit=4096, tp=tp) for tp in (1, 2, 4)})
    w = Workload(0.0, LengthDist.fixed(100), LengthDist.fixed(20))
    p = plan(prof, w, SLO(0.5, 0.05, 0.9), Cluster(gpus_per_node=4), num_requests=200, check=False,
             attention_heads=6)
    assert sorted(p.instance_rps["prefill"]) == [1, 2]
    assert "TP4 not searched: the model's 6 attention heads do not split evenly over 4 GPUs" in p.notes
    only_one = plan(prof, w, SLO(0.5, 0.05, 0.9), Cluster(gpus_per_node=4), num_requests=200, check=False,
                    tensor_parallel_rule=rule)
    assert sorted(only_one.instance_rps["prefill"]) == [1] and only_one.chosen is not None


# ------------------------------------------------------------------------------------------ 3. node locality


@pytest.fixture(scope="module")
def opt13b() -> tuple[ModelProfiles, ModelProfiles, Workload]:
    """OPT-13B's 0.8 MB of KV per token: a hand-off across nodes costs half a 200 ms TTFT, so node locality."""
    dist = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b")
    vllm = ProfileSet.load("a100-80g-vllm").for_model("facebook/opt-13b")
    return dist, vllm, Workload(0.0, SHAREGPT_LIKE.prompt, SHAREGPT_LIKE.output)


def test_a_plan_keeps_node_locality_only_where_the_pools_share_a_node(opt13b):
    dist, vllm, w = opt13b
    args = (dist, w, SLO(0.2, 0.1, 0.9), Cluster(gpus_per_node=4, nodes=2))
    free = plan(*args, colocated_profiles=vllm, num_requests=300, check=False)
    assert free.locality == "node" and free.chosen.kind == "disaggregated"
    why = "spec.prefill.nodeSelector and spec.decode.nodeSelector select different pools (pool=a vs pool=b)"
    split = plan(*args, colocated_profiles=vllm, num_requests=300, check=False, node_locality_blocked=why)
    assert split.chosen.kind == "disaggregated" and split.locality == "any" and split.locality_note == why
    # said where status shows it: the plan's reason and the condition's message
    status = to_status(split)
    assert status["locality"] == "any" and why in status["reason"]
    running = layout((1, 1), (1, 1))
    _apply, _reason, message, _gain = decide(dataclasses.replace(split, target_rps=1.0), running, "apply", 0.1)
    assert f"(locality any: {why})" in message
    # the hand-off crosses nodes: the prefill side pays it, so it carries less than with node locality
    assert split.instance_rps["prefill"][1] < free.instance_rps["prefill"][1]


def test_render_never_requires_a_prefill_pod_on_a_node_the_pools_cannot_share():
    body = vllm_service(layout((1, 1), (1, 2), locality="node"))
    body["spec"]["prefill"]["nodeSelector"] = {"pool": "a", "zone": "z1"}
    body["spec"]["decode"]["nodeSelector"] = {"pool": "b", "zone": "z1"}
    deps = deployments(body)
    assert required_affinity(deps["s-decode"]) == [] and effective(body)["spec"]["kvTransfer"]["locality"] == "any"
    # pools that can meet on one node (same values, or keys only one role selects) keep node locality
    body["spec"]["decode"]["nodeSelector"] = {"pool": "a", "gpu": "a100"}
    assert required_affinity(deployments(body)["s-decode"])


def test_an_online_round_on_split_pools_applies_a_layout_that_schedules():
    from baton.operator.planner.online import tick

    body = vllm_service(slo={"ttft": "200ms", "tpot": "100ms", "attainment": 0.9})
    body["spec"]["planner"].update({"profileModel": "facebook/opt-13b", "cluster": {"gpusPerNode": 4, "nodes": 2}})
    body["spec"]["model"].update(name="opt-13b", maxModelLen=2048)
    body["spec"]["prefill"]["nodeSelector"] = {"pool": "a"}
    body["spec"]["decode"]["nodeSelector"] = {"pool": "b"}
    kube = _Kube(body)
    asyncio.run(tick(kube, asyncio.Lock(), "n", "s", _State(_Source()), lambda *e: None, lambda: None))
    plan_ = kube.body["status"]["plan"]
    assert plan_["decision"] == "PlanApplied" and plan_["locality"] == "any", plan_
    decode = deployments(kube.body)["s-decode"]
    assert required_affinity(decode) == []


# ------------------------------------------------------------------------------------------ 4. colocated


def test_a_colocated_plan_renders_a_colocated_service():
    # OPT-66B with loose SLOs on a node of 8: one colocated TP8 instance wins, though its KV is large
    mp = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-66b")
    w = Workload(0.0, SHAREGPT_LIKE.prompt, SHAREGPT_LIKE.output)
    p = plan(mp, w, SLO(1.0, 0.2, 0.9), Cluster(gpus_per_node=8), num_requests=200, check=False)
    assert p.chosen.kind == "colocated" and p.locality == "any"
    assert to_status(p)["locality"] == "any" and spec_fragment(p)["kvTransfer"] == {"locality": "any"}
    # an applied colocated layout (prefill replicas 0), even one written with node locality: no decode pod
    # requires a prefill pod, and the service is one the webhook admits
    body = vllm_service(layout((1, 0), (1, 3), locality="node"), kvTransfer={"locality": "zone"})
    deps = deployments(body)
    assert deps["s-prefill"]["spec"]["replicas"] == 0 and deps["s-decode"]["spec"]["replicas"] == 3
    assert required_affinity(deps["s-decode"]) == [] and "affinity" not in deps["s-prefill"]["spec"]["template"]["spec"]
    assert admission.review(effective(body)) == []


# ------------------------------------------------------------------------------------------ 5. the gate


def test_a_plan_whose_service_fails_admission_is_reported_and_not_applied():
    from baton.operator.planner.online import tick

    body = vllm_service(slo={"ttft": "200ms", "tpot": "100ms", "attainment": 0.9})
    body["spec"]["engine"].pop("image")  # the webhook refuses vLLM without an image: render could not run it
    body["spec"]["model"].update(name="opt-13b", maxModelLen=2048)
    body["spec"]["planner"].update({"profileModel": "facebook/opt-13b", "cluster": {"gpusPerNode": 4, "nodes": 1}})
    kube, source = _Kube(body), _Source()
    events, kicks = [], []

    def round_() -> None:
        asyncio.run(tick(kube, asyncio.Lock(), "n", "s", _State(source), lambda *e: events.append(e),
                         lambda: kicks.append(1)))

    round_()
    plan_ = kube.body["status"]["plan"]
    assert plan_["decision"] == "PlanInvalid" and plan_.get("applied") is None and kicks == [], plan_
    assert "fails admission: spec.engine.image: is required" in plan_["message"]
    cond = next(c for c in kube.body["status"]["conditions"] if c["type"] == "LayoutPlanned")
    assert (cond["status"], cond["reason"]) == ("False", "PlanInvalid") and "spec.engine.image" in cond["message"]
    assert events == [("Warning", "PlanInvalid", plan_["message"])]
    assert effective(kube.body) is kube.body  # nothing applied: the service runs its spec as written
    # the user fixes the spec (not a plan input): the next round, same load, applies the plan
    kube.body["spec"]["engine"]["image"] = IMAGE
    round_()
    assert kube.body["status"]["plan"]["decision"] == "PlanApplied" and kicks == [1]


def test_the_gate_is_the_webhooks_review_of_the_laid_over_service(opt13b):
    body = vllm_service()
    problems = layout_problems(body, layout((3, 1), (1, 1)))
    assert problems == admission.review(effective(vllm_service(layout((3, 1), (1, 1)))))
    assert any(p.startswith("spec.prefill.tensorParallel: must be a power of two") for p in problems)
    dist, _vllm, w = opt13b
    result = plan(dist, w, SLO(0.2, 0.1, 0.9), Cluster(gpus_per_node=4), num_requests=200, check=False,
                  target_rps=6.0)  # more than 1 + 1 TP1 carries: applied whatever minGain says
    running = layout((1, 1), (1, 1))
    assert decide(result, running, "apply", 0.1)[:2] == (True, "PlanApplied")
    apply, reason, message, _gain = decide(result, running, "apply", 0.1, ["spec.x: refused"])
    assert (apply, reason) == (False, "PlanInvalid") and message.endswith("fails admission: spec.x: refused")


def test_a_plans_replicas_follow_who_scales_each_role():
    """`baton` roles get the plan's replicas as autoscaler floors, an `external` role (HPA/KEDA) keeps its own
    replicas, an `off` role takes the plan's."""
    from baton.operator.planner.overlay import lay

    svc = {"metadata": {"name": "s"}, "spec": {
        "autoscaling": {"mode": "baton", "prometheusURL": "http://prom:9090"},
        "prefill": {"replicas": 1, "autoscaling": {"mode": "external"}},
        "decode": {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 8}}}}
    layout = {"prefill": {"tensorParallel": 1, "replicas": 4}, "decode": {"tensorParallel": 1, "replicas": 3},
              "locality": "any"}
    out = lay(svc, layout)["spec"]
    assert out["prefill"]["replicas"] == 1  # the external scaler's
    assert out["decode"]["autoscaling"]["minReplicas"] == 3 and out["decode"]["replicas"] == 3
    svc["spec"]["autoscaling"] = {"mode": "off"}
    svc["spec"]["prefill"]["autoscaling"] = {}
    out = lay(svc, layout)["spec"]
    assert (out["prefill"]["replicas"], out["decode"]["replicas"]) == (4, 3)
