"""Whether the nodes can hold a plan's GPU pods, before the plan is applied. Pure.

A plan fits `spec.planner.cluster` (the GPUs the planner was told of), but the pods it makes must also fit the
nodes their role's nodeSelector picks: a plan of 3 prefill x TP4 on a pool of two 8-GPU nodes leaves a pod
Pending forever. The pods are the ones render makes for the service with the plan laid over it (one path: the
same manifests the reconciler applies), each with its `nvidia.com/gpu` request and nodeSelector; the nodes are
packed greedily, largest pod first, each into the eligible node with the most GPUs left.

Capacity is the nodes' allocatable GPUs: what other workloads' pods already hold is not subtracted (the
operator lists nodes, not every pod of the cluster), nor are taints, tolerations or the locality affinity
checked. So "fits" means "fits an empty pool" -- a plan that fails here can never run; one that passes can
still wait for GPUs another workload holds.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from baton.operator.api import GPU_RESOURCE
from baton.operator.labels import LABEL_ROLE, WORKER_ROLES
from baton.operator.units import parse_quantity


@dataclass(frozen=True)
class WorkerPods:
    """The pods of one worker role: how many, what each requests, where they may go."""

    role: str
    replicas: int
    gpus: int
    node_selector: dict[str, str]


def worker_pods(manifests: Iterable[dict], replicas: Mapping[str, int] | None = None,
                resource: str = GPU_RESOURCE) -> list[WorkerPods]:
    """The worker Deployments of rendered `manifests` as pods that request `resource` (none: not listed);
    `replicas` by role (the plan's: an autoscaled role's Deployment carries none), else the Deployment's."""
    out = []
    for m in manifests:
        if m.get("kind") != "Deployment":
            continue
        role = (m["metadata"].get("labels") or {}).get(LABEL_ROLE)
        if role not in WORKER_ROLES:
            continue
        pod = m["spec"]["template"]["spec"]
        want = 0
        for c in pod.get("containers", []):
            res = c.get("resources") or {}
            amount = (res.get("requests") or {}).get(resource, (res.get("limits") or {}).get(resource))
            want += int(parse_quantity(str(amount))) if amount is not None else 0
        count = int((replicas or {}).get(role, m["spec"].get("replicas", 1)))
        if want and count:
            out.append(WorkerPods(role, count, want, dict(pod.get("nodeSelector") or {})))
    return out


def _allocatable(node: dict, resource: str) -> int:
    amount = ((node.get("status") or {}).get("allocatable") or {}).get(resource)
    try:
        return int(parse_quantity(str(amount))) if amount is not None else 0
    except ValueError:
        return 0


def _eligible(node: dict, selector: dict[str, str]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return not (node.get("spec") or {}).get("unschedulable") and all(labels.get(k) == v for k, v in selector.items())


def unplaceable(pods: Sequence[WorkerPods], nodes: Sequence[dict], resource: str = GPU_RESOURCE) -> list[str]:
    """Why `pods` do not fit `nodes` (one line per role that does not fit); empty when they do."""
    free = {i: _allocatable(n, resource) for i, n in enumerate(nodes)}
    left: dict[str, int] = {}
    for p in sorted(pods, key=lambda p: -p.gpus):
        eligible = [i for i, n in enumerate(nodes) if _eligible(n, p.node_selector)]
        for _ in range(p.replicas):
            best = max(eligible, key=lambda i: free[i], default=None)
            if best is None or free[best] < p.gpus:
                left[p.role] = left.get(p.role, 0) + 1
                continue
            free[best] -= p.gpus
    problems = []
    for p in pods:
        if p.role not in left:
            continue
        where = ",".join(f"{k}={v}" for k, v in sorted(p.node_selector.items())) or "any node"
        matching = [n for n in nodes if _eligible(n, p.node_selector)]
        total = sum(_allocatable(n, resource) for n in matching)
        most = max((_allocatable(n, resource) for n in matching), default=0)
        problems.append(f"{p.role}: {left[p.role]} of {p.replicas} pods ({p.gpus} {resource} each) do not fit the "
                        f"nodes it selects ({where}: {len(matching)} schedulable nodes, {total} allocatable "
                        f"{resource} in all, at most {most} on one)")
    return problems


def planned_pods(llmservice: dict, layout: Mapping, render) -> list[WorkerPods]:
    """The GPU-requesting worker pods of `llmservice` running `layout` (`status.plan.applied`'s shape), as
    `render` (the operator's) makes them."""
    import copy

    laid = copy.deepcopy(llmservice)
    laid.setdefault("spec", {}).setdefault("planner", {})["mode"] = "apply"
    laid.setdefault("status", {}).setdefault("plan", {})["applied"] = dict(layout)
    return worker_pods(render(laid), {r: int(layout[r]["replicas"]) for r in WORKER_ROLES})
