"""`spec.planner` in the operator: measure the workload, plan, write `status.plan`, and (apply) run the plan.

One loop per LLMService whose `spec.planner.mode` is recommend or apply (one of the operator's own
loops, `service_loops`, started in handlers.py). Every `spec.planner.interval`:

1. Read the workload basis from Prometheus (`autoscaling.prometheusURL`): request rate and request length
   histograms over `spec.planner.window` (outside any lock).
2. Re-plan only when the basis left the hysteresis band around the basis of the plan in `status.plan` (or the
   SLO, cluster or profile changed): no flapping on noise. Planning runs the pure `planner.plan` in a thread,
   for the measured rate as the target, with the built-in profile named in `spec.planner.profile`, and the KV
   hand-off over the link bandwidth the fleet measured (`link.choose_link`; `status.plan.kvLink` says measured
   or configured). The search has no pipeline parallelism (an LLMService cannot say it) and
   offers only the tensor-parallel degrees this service's webhook admits (`admissible.tensor_parallel_rule`:
   the Baton engine runs TP 1 only, the API wants powers of two) and node locality only where the pools let
   a prefill and a decode pod share a node (`overlay.node_pairing_problem`).
3. Compare with the running layout (spec, or the applied plan): the gain is the GPUs the running layout uses
   for the load over the GPUs the plan needs (or "the running layout cannot carry the load"). A plan whose
   layout, laid over the service, fails the webhook's review (`admissible.layout_problems`, the checks a
   user's spec goes through) is reported as `PlanInvalid` and never applied; one whose GPU pods the nodes their
   roles select cannot hold (`placement.py`: allocatable GPUs, the nodes listed) as `PlanUnplaceable`.
4. Under the Reconciler's per-LLMService lock, merge-patch `status.plan` and the `LayoutPlanned` condition;
   post `PlanRecommended` when a new plan differs from what runs, `PlanApplied` when apply mode runs it
   (gain at least `minGain`), then kick a reconcile, which renders the plan over the spec
   (`overlay.effective`; worker Deployments roll one pod at a time: maxSurge 1, maxUnavailable 0).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from baton.operator import api
from baton.operator.kube import GROUP, VERSION, Kube, KubeError
from baton.operator.planner.admissible import layout_problems, profile_attention_heads, tensor_parallel_rule
from baton.operator.planner.basis import WorkloadBasis, moved
from baton.operator.planner.link import LinkMeasurement, choose_link
from baton.operator.planner.overlay import (
    ROLES,
    layout_of,
    node_pairing_problem,
    planner_mode,
    running_layout,
    same_layout,
)
from baton.operator.planner.placement import planned_pods, unplaceable
from baton.operator.planner.report import to_status
from baton.operator.planner.search import SLO, Cluster, Plan, plan
from baton.operator.prometheus import PrometheusError, PrometheusUnavailable
from baton.operator.reconcile import now_rfc3339
from baton.operator.status import set_condition

from baton.profile import BUILTIN, ModelProfiles, ProfileSet

log = logging.getLogger("baton.operator.planner")

LAYOUT_PLANNED = api.ConditionType.LAYOUT_PLANNED
EventSink = Callable[[str, str, str], None]
#: decisions that keep a plan from running (a Warning Event; re-made every round, as what fixes them -- a spec
#: edit, the nodes -- is not among the plan's inputs)
BLOCKED = ("PlanInvalid", "PlanUnplaceable")
#: requests per simulation online: enough for a stable p90, small enough to plan in a second or two
ONLINE_REQUESTS = 500


def plan_inputs_key(spec: api.LLMServiceSpec) -> str:
    """A short hash of everything besides the workload that a plan and its decision depend on (a change
    re-plans at once: switching recommend to apply applies the plan without waiting for the load to move)."""
    p = spec.planner
    doc = {"slo": [spec.slo.ttft.seconds, spec.slo.tpot.seconds, spec.slo.attainment],
           "profile": [p.profile, p.profile_model], "cluster": p.cluster.model_dump(mode="json"),
           "engine": spec.engine.kind, "mode": p.mode, "minGain": p.min_gain,
           # the pools decide whether node locality is possible at all
           "pools": [spec.prefill.node_selector, spec.decode.node_selector]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def model_profiles(spec: api.LLMServiceSpec) -> ModelProfiles:
    """The profile the planner simulates with; ValueError naming the field when it cannot. Every degree it
    has: which ones the engine runs is the webhook's to say (`admissible.tensor_parallel_rule`)."""
    p = spec.planner
    if p.profile not in BUILTIN:
        raise ValueError(f"spec.planner.profile: {p.profile!r} is not a built-in profile "
                         f"({', '.join(sorted(BUILTIN))})")
    ps = ProfileSet.load(p.profile)
    model = p.profile_model or (spec.model.name if spec.model.name in ps.models else None)
    try:
        return ps.for_model(model)
    except ValueError as exc:
        raise ValueError(f"spec.planner.profileModel: {exc}") from None


def model_attention_heads(spec: api.LLMServiceSpec, profiles: ModelProfiles) -> int | None:
    """The model's attention heads when the built-in profile names them (TP must divide them)."""
    return profile_attention_heads(ProfileSet.load(spec.planner.profile), profiles.model)


def layout_capacity(result: Plan, layout: dict) -> tuple[float | None, int]:
    """(requests/s the running layout carries by the plan's per-instance numbers, its GPUs); None when its
    tensor-parallel degrees were not simulated."""
    g = result.instance_rps
    p, d = layout["prefill"], layout["decode"]
    gpus = p["replicas"] * p["tensorParallel"] + d["replicas"] * d["tensorParallel"]
    if p["replicas"] == 0:
        per = g.get("colocated", {}).get(d["tensorParallel"])
        return (None if per is None else d["replicas"] * per), gpus
    gp, gd = g.get("prefill", {}).get(p["tensorParallel"]), g.get("decode", {}).get(d["tensorParallel"])
    if gp is None or gd is None:
        return None, gpus
    return min(p["replicas"] * gp, d["replicas"] * gd), gpus


def decide(result: Plan, layout: dict, mode: str, min_gain: float,
           problems: Sequence[str] = ()) -> tuple[bool, str, str, float | None]:
    """(apply it?, condition reason, message, gain). `problems`: the webhook's with the plan laid over the
    service (`admissible.layout_problems`); any of them and the plan is `PlanInvalid`, never applied. Pure."""
    c = result.chosen
    assert c is not None
    cap, gpus = layout_capacity(result, layout)
    rate = result.target_rps or 0.0
    want = to_status(result)
    if same_layout(want, layout):
        return False, "LayoutMatchesPlan", f"the running layout is the plan: {c.describe()}", 0.0
    if cap is None:
        gain, why = None, "the running layout's tensor parallelism is not in the profile"
    elif cap < rate:
        gain, why = None, f"the running layout carries {cap:.2f} req/s, below the measured {rate:.2f} req/s"
    else:
        gain = gpus / c.gpus - 1 if c.gpus else None
        why = f"the plan needs {c.gpus} GPUs for {rate:.2f} req/s, the running layout uses {gpus}"
    locality = f"locality {result.locality}" + (f": {result.locality_note}" if result.locality_note else "")
    message = f"plan {c.describe()} ({locality}): {why}"
    if problems:
        return False, "PlanInvalid", (f"{message}; not {'applied' if mode == 'apply' else 'recommended'}: the "
                                      f"LLMService with this layout fails admission: {'; '.join(problems)}"), gain
    if mode != "apply":
        return False, "PlanRecommended", message, gain
    under = cap is not None and cap < rate
    if under or (gain is not None and gain >= min_gain):
        return True, "PlanApplied", message, gain
    if cap is None:
        return False, "CurrentLayoutUnprofiled", message + "; not applied", gain
    return False, "GainBelowThreshold", (f"{message}; gain {gain:+.0%} is below minGain {min_gain:.0%}, "
                                         "not applied"), gain


async def tick(kube: Kube, lock: asyncio.Lock, namespace: str, name: str, state: Any, emit: EventSink,
               kick: Callable[[], None] | None = None) -> dict | None:
    """One planning round (see the module docstring). Returns the status patch written, or None."""
    llms = await asyncio.to_thread(kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name)
    if llms is None or (llms.get("metadata") or {}).get("deletionTimestamp"):
        return None
    mode = planner_mode(llms)
    if mode == "off":
        return None
    try:
        svc = api.parse_llmservice(llms)
    except api.InvalidLLMService as exc:
        log.warning("%s/%s: not planning an invalid LLMService: %s", namespace, name, exc)
        return None
    spec = svc.spec
    pspec = spec.planner
    previous = (llms.get("status") or {}).get("plan") or {}
    inputs = plan_inputs_key(spec)

    cond: tuple[str, str, str]
    new_plan: dict | None = None
    apply_now = False
    try:
        profiles = model_profiles(spec)
        source = state.source(spec.autoscaling.prometheus_url, pspec.window.seconds, pspec.interval.seconds)
        numbers = await source.workload(name, namespace, pspec.window.seconds)
        if not numbers["rate"] or numbers["input_mean"] is None or numbers["output_mean"] is None:
            cond = ("Unknown", "NoTraffic", f"no requests measured in the last {pspec.window}; keeping the plan")
        else:
            layout = running_layout(llms)
            # the KV hand-off bandwidth the fleet measured, for the link its hand-offs crossed (else configured)
            link = choose_link(
                Cluster(pspec.cluster.gpus_per_node, pspec.cluster.nodes, pspec.cluster.intra_node_gbps,
                        pspec.cluster.inter_node_gbps),
                LinkMeasurement(numbers.get("kv_bytes_per_s"), numbers.get("kv_seconds_per_s"),
                                numbers.get("kv_transfers_per_s"), pspec.window.seconds),
                layout.get("locality", "any"))
            basis = WorkloadBasis(numbers["rate"], numbers["input_mean"], numbers["input_p90"],
                                  numbers["output_mean"], numbers["output_p90"],
                                  link.measured_gb_s if link.source == "measured" else None)
            # a PlanInvalid or PlanUnplaceable plan is re-made every round: the spec edit or the nodes that
            # fix it are not among `inputs`
            if (not moved(basis, previous.get("basis"), pspec.hysteresis) and previous.get("inputs") == inputs
                    and previous.get("decision") not in BLOCKED):
                new_plan = previous
                matches = same_layout(previous, layout)
                cond = (("True", "LayoutMatchesPlan", "the running layout is the plan") if matches else
                        ("False", previous.get("decision", "PlanRecommended"), previous.get("message", "")))
            else:
                result = await asyncio.to_thread(
                    plan, profiles, basis.workload(spec.model.max_model_len), SLO(spec.slo.ttft.seconds, spec.slo.tpot.seconds,
                                                          spec.slo.attainment),
                    link.cluster, link_source=link.why, pipeline=False,  # an LLMService has no pipeline field
                    target_rps=basis.rate, num_requests=ONLINE_REQUESTS, check=False,
                    tensor_parallel_rule=tensor_parallel_rule(llms),
                    attention_heads=model_attention_heads(spec, profiles),
                    node_locality_blocked=node_pairing_problem(llms.get("spec") or {}))
                if result.chosen is None:
                    msg = "; ".join(result.notes) or result.why()
                    cond = ("False", "NoFeasiblePlan", msg)
                    new_plan = {**to_status(result), "basis": basis.to_status(), "inputs": inputs,
                                "time": now_rfc3339(), "applied": previous.get("applied"),
                                "decision": "NoFeasiblePlan", "message": msg}
                else:
                    planned = layout_of(to_status(result))
                    problems = layout_problems(llms, planned)
                    apply_now, reason, message, gain = decide(result, layout, mode, pspec.min_gain, problems)
                    if apply_now:  # the nodes its pods select must hold them (placement.py)
                        unfit, note = await asyncio.to_thread(placement_check, kube, llms, planned)
                        if unfit:
                            apply_now, reason = False, "PlanUnplaceable"
                            message += "; not applied: the nodes cannot hold its pods: " + "; ".join(unfit)
                        elif note:
                            message += f"; {note}"
                    matches = reason == "LayoutMatchesPlan"
                    stamp = now_rfc3339()
                    new_plan = {**to_status(result), "basis": basis.to_status(), "inputs": inputs,
                                "time": stamp, "decision": reason, "message": message,
                                "predictedGain": None if gain is None else round(gain, 4),
                                # what runs: this plan when applied now, else the last applied one (if any)
                                "applied": ({**layout_of(to_status(result)), "time": stamp} if apply_now
                                            else previous.get("applied"))}
                    cond = ("True" if matches or apply_now else "False", reason, message)
                    if apply_now:
                        emit("Normal", "PlanApplied", message)
                    elif not matches and _changed(previous, new_plan):
                        emit("Warning" if reason in BLOCKED else "Normal", reason, message)
    except ValueError as exc:
        cond = ("Unknown", "ProfileInvalid", str(exc))
    except PrometheusError as exc:
        reason = "PrometheusUnreachable" if isinstance(exc, PrometheusUnavailable) else "PrometheusQueryFailed"
        cond = ("Unknown", reason, f"{exc}; keeping the plan")

    async with lock:
        fresh = await asyncio.to_thread(kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name) or llms
        status = fresh.get("status") or {}
        generation = int((fresh.get("metadata") or {}).get("generation") or 0)
        conditions = set_condition(list(status.get("conditions") or []), LAYOUT_PLANNED, *cond, now_rfc3339(),
                                   generation)
        patch: dict = {}
        if new_plan is not None and new_plan is not previous:
            patch["plan"] = new_plan
        if conditions != (status.get("conditions") or []):
            patch["conditions"] = conditions
        if patch:
            try:
                await asyncio.to_thread(kube.patch_llmservice_status, namespace, name, patch)
            except KubeError as exc:
                log.warning("%s/%s: writing the plan failed: %s", namespace, name, exc)
                return None
    if apply_now and kick is not None:
        kick()
    return patch


def placement_check(kube: Kube, llms: dict, layout: dict) -> tuple[list[str], str]:
    """(why the nodes cannot hold the pods of `llms` running `layout`, a note): nothing to check for pods that
    request no GPUs; without the right to list nodes (chart value rbac.readNodes false) the plan is applied
    unchecked and the note says so."""
    from baton.operator.render import render

    pods = planned_pods(llms, layout, render)
    if not pods:
        return [], ""
    try:
        nodes = kube.list("v1", "Node", None)
    except KubeError as exc:
        return [], f"placement not checked: cannot list nodes ({exc})"
    return unplaceable(pods, nodes), ""


def _changed(previous: dict, new: dict) -> bool:
    keys = (*ROLES, "locality", "layout")
    return any(previous.get(k) != new.get(k) for k in keys)


async def run(kube: Kube, lock_for: Callable[[], asyncio.Lock], namespace: str, name: str, state: Any,
              stopped: Any, emit: EventSink, kick: Callable[[], None]) -> None:
    """The loop of one LLMService until `stopped` is set."""
    log.info("%s/%s: planner started", namespace, name)
    try:
        while not stopped:
            interval = 300.0
            try:
                llms = await asyncio.to_thread(kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name)
                if llms is not None:
                    try:
                        interval = api.parse_llmservice(llms).spec.planner.interval.seconds
                    except api.InvalidLLMService:
                        pass
                await tick(kube, lock_for(), namespace, name, state, emit, kick)
            except Exception:  # one bad round must not end the loop
                log.exception("%s/%s: planner round failed", namespace, name)
            await stopped.wait(interval)
    finally:
        await state.close()
        log.info("%s/%s: planner stopped", namespace, name)


__all__ = ["decide", "layout_capacity", "model_attention_heads", "model_profiles", "plan_inputs_key", "run", "tick"]
