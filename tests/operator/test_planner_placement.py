"""An applied plan's GPU pods must fit the nodes their roles select (`operator/planner/placement.py`): a plan
that cannot be placed is reported (`PlanUnplaceable`), not applied."""
from __future__ import annotations

import asyncio

from baton.operator.planner.online import tick
from baton.operator.planner.placement import WorkerPods, planned_pods, unplaceable
from baton.operator.render import render

from tests.operator.test_planner import _Kube, _Source, _State
from tests.operator.test_planner_apply import IMAGE, layout, vllm_service

GPU = "nvidia.com/gpu"


def node(name: str, gpus: int, pool: str | None = None, unschedulable: bool = False) -> dict:
    return {"metadata": {"name": name, "labels": {"baton.dev/pool": pool} if pool else {}},
            "spec": {"unschedulable": True} if unschedulable else {},
            "status": {"allocatable": {GPU: str(gpus), "cpu": "64"}}}


def test_pods_are_packed_into_the_nodes_their_selector_picks():
    prefill = WorkerPods("prefill", 2, 4, {"baton.dev/pool": "prefill"})
    decode = WorkerPods("decode", 3, 2, {"baton.dev/pool": "decode"})
    nodes = [node("p0", 8, "prefill"), node("d0", 4, "decode"), node("d1", 2, "decode")]
    assert unplaceable([prefill, decode], nodes) == []
    # an instance larger than any one node, however many GPUs the pool has in all
    wide = WorkerPods("prefill", 1, 8, {"baton.dev/pool": "decode"})
    (why,) = unplaceable([wide], nodes)
    assert why == ("prefill: 1 of 1 pods (8 nvidia.com/gpu each) do not fit the nodes it selects "
                   "(baton.dev/pool=decode: 2 schedulable nodes, 6 allocatable nvidia.com/gpu in all, at most 4 on one)")
    # too many instances for the pool; an unschedulable (cordoned) node does not count
    assert unplaceable([WorkerPods("decode", 4, 2, {"baton.dev/pool": "decode"})], nodes)[0].startswith(
        "decode: 1 of 4 pods")
    cordoned = [node("p0", 8, "prefill", unschedulable=True)]
    assert unplaceable([prefill], cordoned)[0].startswith("prefill: 2 of 2 pods")
    # roles that share nodes share their GPUs
    shared = [node("n0", 8)]
    assert unplaceable([WorkerPods("prefill", 1, 4, {}), WorkerPods("decode", 2, 2, {})], shared) == []
    assert unplaceable([WorkerPods("prefill", 1, 4, {}), WorkerPods("decode", 3, 2, {})], shared) != []


def test_the_pods_are_the_ones_render_makes_for_the_plan():
    body = vllm_service(prefill={"replicas": 1, "tensorParallel": 1, "nodeSelector": {"baton.dev/pool": "prefill"}})
    pods = planned_pods(body, layout((2, 3), (1, 2)), render)
    assert {(p.role, p.replicas, p.gpus) for p in pods} == {("prefill", 3, 2), ("decode", 2, 1)}
    assert next(p for p in pods if p.role == "prefill").node_selector == {"baton.dev/pool": "prefill"}
    cpu = vllm_service(accelerator="cpu")  # no GPU requested: nothing to place
    assert planned_pods(cpu, layout((1, 3), (1, 2)), render) == []


def _service() -> dict:
    body = vllm_service(slo={"ttft": "200ms", "tpot": "100ms", "attainment": 0.9})
    body["spec"]["engine"]["image"] = IMAGE
    body["spec"]["model"].update(name="opt-13b", maxModelLen=2048)
    body["spec"]["planner"].update({"profileModel": "facebook/opt-13b", "cluster": {"gpusPerNode": 4, "nodes": 1}})
    return body


def _round(kube: _Kube) -> tuple[list, list]:
    events, kicks = [], []
    asyncio.run(tick(kube, asyncio.Lock(), "n", "s", _State(_Source()), lambda *e: events.append(e),
                     lambda: kicks.append(1)))
    return events, kicks


def test_a_plan_the_nodes_cannot_hold_is_reported_not_applied():
    kube = _Kube(_service(), nodes=[node("small", 1)])  # one GPU: the plan (6 req/s of OPT-13B) needs more
    events, kicks = _round(kube)
    plan_ = kube.body["status"]["plan"]
    assert plan_["decision"] == "PlanUnplaceable" and plan_.get("applied") is None and kicks == [], plan_
    assert "not applied: the nodes cannot hold its pods: " in plan_["message"] and "1 allocatable" in plan_["message"]
    cond = next(c for c in kube.body["status"]["conditions"] if c["type"] == "LayoutPlanned")
    assert (cond["status"], cond["reason"]) == ("False", "PlanUnplaceable")
    assert events == [("Warning", "PlanUnplaceable", plan_["message"])]
    # a node with room: the next round applies it
    kube.nodes.append(node("big", 8))
    _round(kube)
    assert kube.body["status"]["plan"]["decision"] == "PlanApplied"


def test_without_the_right_to_list_nodes_the_plan_is_applied_and_says_unchecked():
    kube = _Kube(_service(), nodes=None)
    _, kicks = _round(kube)
    plan_ = kube.body["status"]["plan"]
    assert plan_["decision"] == "PlanApplied" and kicks == [1]
    assert "placement not checked: cannot list nodes (nodes is forbidden" in plan_["message"]
