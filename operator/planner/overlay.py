"""`spec.planner.mode: apply`: the layout the service runs is the spec with the applied plan laid over it.

The planner never edits the user's spec (GitOps tools would fight it). When it decides to run a plan it
copies the plan's layout into `status.plan.applied` (per-phase `tensorParallel` and `replicas`, `locality`,
`time`); a later plan that is only recommended (gain below `minGain`) leaves `applied` as it was, so the
service keeps running the last applied layout. Render and the autoscaler read the LLMService through
`effective(llmservice)`, which lays `applied` over the spec. With autoscaling on, the plan's replicas become the autoscaler's floors
(`minReplicas`, never above `maxReplicas`): the planner sizes for the measured load, the autoscaler still
reacts to bursts above it. Pure.
"""
from __future__ import annotations

import copy
from typing import Any

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


def effective(llmservice: dict) -> dict:
    """The LLMService with an applied plan laid over its spec (the input when there is none). Not modified."""
    plan = applied_plan(llmservice)
    if plan is None:
        return llmservice
    out = copy.deepcopy(llmservice)
    spec: dict[str, Any] = out.setdefault("spec", {})
    autoscaling = bool((spec.get("autoscaling") or {}).get("enabled"))
    for role in ROLES:
        want = plan[role]
        r = spec.setdefault(role, {})
        if "tensorParallel" in want:
            r["tensorParallel"] = int(want["tensorParallel"])
        if "replicas" not in want:
            continue
        replicas = int(want["replicas"])
        if autoscaling:
            bounds = r.setdefault("autoscaling", {})
            high = int(bounds.get("maxReplicas", 8))
            floor = min(replicas, high)
            bounds["minReplicas"] = max(int(bounds.get("minReplicas", 1)), floor)
            r["replicas"] = max(int(r.get("replicas", 1)), bounds["minReplicas"])
            r["replicas"] = min(r["replicas"], high)
        else:
            r["replicas"] = replicas
    if plan.get("locality"):
        spec.setdefault("kvTransfer", {})["locality"] = plan["locality"]
    return out


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
