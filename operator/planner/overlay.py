"""`spec.planner.mode: apply`: the layout the service runs is the spec with the applied plan laid over it.

The planner never edits the user's spec (GitOps tools would fight it). When it decides to run a plan it
copies the plan's layout into `status.plan.applied` (per-phase `tensorParallel` and `replicas`, `locality`,
`time`); a later plan that is only recommended (gain below `minGain`) leaves `applied` as it was, so the
service keeps running the last applied layout. Render and the autoscaler read the LLMService through
`effective(llmservice)`, which lays `applied` over the spec (`lay`). The plan's replicas depend on who scales
the role (`autoscaling.mode`): with `baton` they become the autoscaler's floors (`minReplicas`, never above
`maxReplicas`: the planner sizes for the measured load, the autoscaler still reacts to bursts above it); with
`external` the role keeps its replicas (HPA or KEDA owns them; the plan sets its tensor parallelism only); with
`off` they are the replicas.

What `lay` does besides copying numbers, so that the laid spec is one that can run:

* a role whose tensor parallelism changes gets its `nvidia.com/gpu` request/limit scaled with it
  (`follow_tensor_parallel`): the API refuses a GPU limit below tensorParallel;
* `kvTransfer.locality: node` only when a node can hold both roles (`node_pairing_problem`): with
  nodeSelectors for different pools, decode pods that require a prefill pod on their node never schedule;
* a colocated layout (prefill replicas 0: a decode-only fleet, the router recomputes prompts on decode) gets
  `locality: any`: there are no prefill pods for decode pods to require.

Pure.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from baton.operator.api import AUTOSCALING_BATON, AUTOSCALING_EXTERNAL, GPU_RESOURCE, autoscaling_mode
from baton.operator.units import parse_quantity

ROLES = ("prefill", "decode")


def planner_mode(llmservice: dict) -> str:
    mode = ((llmservice.get("spec") or {}).get("planner") or {}).get("mode", "off")
    return "off" if mode is False else str(mode)  # YAML 1.1 reads an unquoted `off` as false


def applied_plan(llmservice: dict) -> dict | None:
    """The layout the service should run, or None (not in apply mode, or no plan applied yet)."""
    if planner_mode(llmservice) != "apply":
        return None
    applied = ((llmservice.get("status") or {}).get("plan") or {}).get("applied")
    return applied if isinstance(applied, dict) and all(isinstance(applied.get(r), dict) for r in ROLES) else None


def layout_of(plan: dict) -> dict:
    """The part of a `status.plan` that `applied` keeps."""
    return {**{r: dict(plan[r]) for r in ROLES}, "locality": plan.get("locality", "any")}


def is_colocated(layout: Mapping[str, Any]) -> bool:
    """A colocated layout: no prefill pool (Baton serves colocation as a decode-only fleet)."""
    return layout.get("layout") == "colocated" or _int((layout.get("prefill") or {}).get("replicas"), 1) == 0


def node_pairing_problem(spec: Mapping[str, Any]) -> str | None:
    """Why no node can run a prefill and a decode pod of this spec, or None when one can (as far as the
    nodeSelectors say: a key both roles select with different values rules every node out).

    `kvTransfer.locality: node` makes decode pods *require* a prefill pod on their node; with such
    selectors that never happens and decode stays Pending forever, so neither the planner nor `lay` asks for
    node locality then."""
    pools = [((spec.get(role) or {}).get("nodeSelector") or {}) for role in ROLES]
    if not all(isinstance(p, Mapping) for p in pools):
        return None  # not a valid spec: validation reports it
    prefill, decode = pools
    clash = sorted(k for k in prefill.keys() & decode.keys() if str(prefill[k]) != str(decode[k]))
    if not clash:
        return None
    what = ", ".join(f"{k}={prefill[k]} vs {k}={decode[k]}" for k in clash)
    return (f"spec.prefill.nodeSelector and spec.decode.nodeSelector select different pools ({what}): no node "
            "runs both roles, so a decode pod could never have a prefill pod on its node")


def follow_tensor_parallel(role: dict, tensor_parallel: int) -> None:
    """Set `role`'s tensorParallel, scaling the user's `nvidia.com/gpu` request and limit by the same factor.

    GPUs follow TP: `gpus x new/old` rounded up, never below the new TP (so a user who gave a TP2 worker a
    whole 8-GPU node keeps a 4x margin, and the usual `gpu = TP` stays `gpu = TP`). Without a GPU entry the
    render already requests `nvidia.com/gpu = tensorParallel` on `accelerator: gpu`, and a cpu service has
    none (the API refuses GPUs there), so only entries the user wrote are touched.

    CPU and memory are kept as written, on purpose: a worker's host memory is dominated by the model (the
    same weights, whatever the split) and its CPU need by the engine's front-end, so scaling them with TP could
    leave a wider pod Pending on a node that fits its GPUs, or OOM-kill a narrower one. Modifies `role`.
    """
    old = max(1, _int(role.get("tensorParallel"), 1))
    role["tensorParallel"] = tensor_parallel
    if tensor_parallel == old:
        return
    resources = role.get("resources")
    if not isinstance(resources, dict):
        return
    for kind in ("limits", "requests"):
        values = resources.get(kind)
        if not isinstance(values, dict) or GPU_RESOURCE not in values:
            continue
        try:
            gpus = parse_quantity(values[GPU_RESOURCE])
        except ValueError:
            continue  # validation reports the bad quantity
        values[GPU_RESOURCE] = str(max(tensor_parallel, math.ceil(gpus * tensor_parallel / old)))


def lay(llmservice: dict, layout: Mapping[str, Any]) -> dict:
    """The LLMService with `layout` (`applied`'s shape) laid over its spec, whatever the planner mode (the
    planner checks a plan with it before running it). The input is not modified."""
    out = copy.deepcopy(llmservice)
    spec: dict[str, Any] = out.setdefault("spec", {})
    modes = {role: autoscaling_mode(spec, role) for role in ROLES}  # before anything is laid over the spec
    for role in ROLES:
        want = layout[role]
        r = spec.setdefault(role, {})
        if "tensorParallel" in want:
            follow_tensor_parallel(r, int(want["tensorParallel"]))
        if "replicas" not in want:
            continue
        replicas = int(want["replicas"])
        if modes[role] == AUTOSCALING_EXTERNAL:
            continue  # an external scaler (HPA, KEDA) owns this role's replicas: the plan sizes TP only
        if modes[role] == AUTOSCALING_BATON:
            bounds = r.setdefault("autoscaling", {})
            high = int(bounds.get("maxReplicas", 8))
            floor = min(replicas, high)
            bounds["minReplicas"] = max(int(bounds.get("minReplicas", 1)), floor)
            r["replicas"] = max(int(r.get("replicas", 1)), bounds["minReplicas"])
            r["replicas"] = min(r["replicas"], high)
        else:
            r["replicas"] = replicas
    locality = "any" if is_colocated(layout) else layout.get("locality")
    if locality == "node" and node_pairing_problem(spec):
        locality = "any"
    if locality:
        spec.setdefault("kvTransfer", {})["locality"] = locality
    return out


def effective(llmservice: dict) -> dict:
    """The LLMService with an applied plan laid over its spec (the input when there is none). Not modified."""
    plan = applied_plan(llmservice)
    return llmservice if plan is None else lay(llmservice, plan)


def running_layout(llmservice: dict) -> dict[str, Any]:
    """What the service runs now, in `status.plan`'s terms (for comparing with a new plan)."""
    spec = effective(llmservice).get("spec") or {}
    out: dict[str, Any] = {}
    for role in ROLES:
        r = spec.get(role) or {}
        out[role] = {"tensorParallel": int(r.get("tensorParallel", 1)), "replicas": int(r.get("replicas", 1))}
    out["locality"] = (spec.get("kvTransfer") or {}).get("locality", "any")
    return out


def same_layout(plan: dict, layout: dict) -> bool:
    return all(plan.get(r) == layout.get(r) for r in ROLES) and (
        plan.get("locality") in (None, layout.get("locality")) or plan.get("layout") == "colocated")


def _int(value: Any, default: int) -> int:
    """`value` as an int, `default` when it is none (an invalid spec still renders its validation errors)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
