"""Pure computation of an LLMService's status from its child Deployments.

Kept free of I/O so every rule (what "ready" means, when the phase is Degraded, which conditions change) is
unit-tested without a cluster; the reconciler only gathers the inputs and writes the result.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode", "router")
#: Conditions this module owns; others (SLOMet, KVTransportDegraded) belong to the autoscaler and are kept.
ROLE_CONDITION = {"prefill": "PrefillReady", "decode": "DecodeReady", "router": "RouterReady"}


@dataclass(frozen=True)
class RoleReadiness:
    ready: bool
    reason: str
    message: str
    replicas: int  # desired by the Deployment's spec
    ready_replicas: int
    current_replicas: int  # pods that exist (status.replicas)


def role_readiness(role: str, deployment: dict | None) -> RoleReadiness:
    """Whether one role's Deployment has rolled out its current spec and has all desired pods ready."""
    if deployment is None:
        return RoleReadiness(False, "NotCreated", f"the {role} Deployment does not exist yet", 0, 0, 0)
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    desired = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    current = int(status.get("replicas") or 0)
    name = meta.get("name", role)
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return RoleReadiness(False, "RolloutPending", f"Deployment {name} has not observed its latest spec yet",
                             desired, ready, current)
    if desired == 0:
        return RoleReadiness(True, "ScaledToZero", f"Deployment {name} is scaled to zero", 0, ready, current)
    if updated < desired:
        return RoleReadiness(False, "RollingOut", f"Deployment {name}: {updated}/{desired} pods updated",
                             desired, ready, current)
    if ready < desired:
        return RoleReadiness(False, "PodsNotReady", f"Deployment {name}: {ready}/{desired} pods ready",
                             desired, ready, current)
    return RoleReadiness(True, "AllReplicasReady", f"Deployment {name}: {ready}/{desired} pods ready",
                         desired, ready, current)


def set_condition(conditions: list[dict], type_: str, status: bool | str, reason: str, message: str,
                  now: str, generation: int | None = None) -> list[dict]:
    """Return `conditions` with `type_` set; lastTransitionTime only moves when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.get("status") != value
        new = {"type": type_, "status": value, "reason": reason, "message": message,
               "lastTransitionTime": now if changed else cond.get("lastTransitionTime", now)}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": now}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def compute_status(llmservice: dict, deployments: dict[str, dict | None], now: str,
                   apply_error: str | None = None) -> dict:
    """The status the reconciler writes (a merge patch of `.status`; fields owned by others are left alone).

    `deployments` maps each role to its Deployment as read after applying (None if it is missing).
    `apply_error` is set when applying the children failed; the phase is then Failed and Ready is False.
    """
    meta = llmservice.get("metadata") or {}
    previous = llmservice.get("status") or {}
    generation = int(meta.get("generation") or 0)
    name, namespace = meta.get("name", ""), meta.get("namespace", "default")
    conditions = list(previous.get("conditions") or [])
    roles = {role: role_readiness(role, deployments.get(role)) for role in ROLES}

    status: dict = {"observedGeneration": generation, "endpoint": f"http://{name}.{namespace}.svc:80"}
    for role, readiness in roles.items():
        entry = {"replicas": readiness.current_replicas, "readyReplicas": readiness.ready_replicas}
        if role != "router":
            entry["desiredReplicas"] = readiness.replicas
        status[role] = entry
        conditions = set_condition(conditions, ROLE_CONDITION[role], readiness.ready, readiness.reason,
                                   readiness.message, now, generation)

    not_ready = [role for role in ROLES if not roles[role].ready]
    if apply_error:
        phase = "Failed"
        conditions = set_condition(conditions, "Ready", False, "ApplyFailed", apply_error, now, generation)
    elif not not_ready:
        phase = "Ready"
        conditions = set_condition(conditions, "Ready", True, "AllRolesReady",
                                   "prefill, decode and router are ready", now, generation)
    else:
        missing = [role for role in ROLES if deployments.get(role) is None]
        was_ready = previous.get("phase") in ("Ready", "Degraded")
        same_spec = previous.get("observedGeneration") == generation
        if missing:
            phase = "Pending"
        elif was_ready and same_spec:
            phase = "Degraded"
        else:
            phase = "Progressing"
        detail = "; ".join(roles[role].message for role in not_ready)
        conditions = set_condition(conditions, "Ready", False, f"{'And'.join(r.capitalize() for r in not_ready)}NotReady",
                                   detail, now, generation)
    status["phase"] = phase
    status["conditions"] = conditions
    return status
