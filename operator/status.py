"""Pure computation of an LLMService's status from its child Deployments.

Kept free of I/O so every rule (what "ready" means, when the phase is Degraded, which conditions change) is
unit-tested without a cluster; the reconciler only gathers the inputs and writes the result.
"""
from __future__ import annotations

from dataclasses import dataclass

from baton.operator import api
from baton.operator.model_fetch_status import ModelFetch
from baton.operator.naming import router_service_name

ROLES = ("prefill", "decode", "router")
#: Conditions this module owns; others (SLOMet, KVTransportDegraded) belong to the autoscaler and are kept.
ROLE_CONDITION = {"prefill": "PrefillReady", "decode": "DecodeReady", "router": "RouterReady"}
KV_SECRET_READY = api.ConditionType.KV_SECRET_READY
KV_SECRET_CONFLICT = "KVSecretConflict"


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
    """`api.set_condition` on the plain dicts the apiserver returns and a merge patch needs."""
    updated = api.set_condition(conditions, type_, status, reason, message, now, generation)
    return [c.model_dump(by_alias=True, mode="json", exclude_none=True) for c in updated]


def compute_status(llmservice: dict, deployments: dict[str, dict | None], now: str,
                   apply_error: str | None = None, model: ModelFetch | None = None,
                   kv_secret_conflict: str | None = None) -> dict:
    """The status the reconciler writes (a merge patch of `.status`; fields owned by others are left alone).

    `deployments` maps each role to its Deployment as read after applying (None if it is missing).
    `apply_error` is set when applying the children failed; the phase is then Failed and Ready is False.
    `model` (services with a `uri` source only): the download's outcome, as condition `ModelReady`; a failed
    download makes the phase Failed with the fetcher's own message, instead of pods that are never ready.
    `kv_secret_conflict`: why the KV Secret is not this operator's (kv_secret.py); the workers were not started
    with it, so the phase is Failed with condition KVSecretReady=False. The condition appears only once a
    conflict was seen, and turns True when it is resolved.
    """
    meta = llmservice.get("metadata") or {}
    previous = llmservice.get("status") or {}
    generation = int(meta.get("generation") or 0)
    name, namespace = meta.get("name", ""), meta.get("namespace", "default")
    conditions = list(previous.get("conditions") or [])
    roles = {role: role_readiness(role, deployments.get(role)) for role in ROLES}

    status: dict = {"observedGeneration": generation, "endpoint": f"http://{router_service_name(name)}.{namespace}.svc:80"}
    for role, readiness in roles.items():
        entry = {"replicas": readiness.current_replicas, "readyReplicas": readiness.ready_replicas,
                 "ready": f"{readiness.ready_replicas}/{readiness.replicas}"}
        if role != "router":
            entry["desiredReplicas"] = readiness.replicas
        status[role] = entry
        conditions = set_condition(conditions, ROLE_CONDITION[role], readiness.ready, readiness.reason,
                                   readiness.message, now, generation)

    if model is not None:
        conditions = set_condition(conditions, "ModelReady", "Unknown" if model.ok is None else model.ok,
                                   model.reason, model.message, now, generation)
    if kv_secret_conflict:
        conditions = set_condition(conditions, KV_SECRET_READY, False, KV_SECRET_CONFLICT, kv_secret_conflict,
                                   now, generation)
    elif any(c.get("type") == KV_SECRET_READY for c in conditions):
        conditions = set_condition(conditions, KV_SECRET_READY, True, "KVSecretOwned",
                                   "the KV Secret the workers use was made by this operator for this LLMService",
                                   now, generation)
    not_ready = [role for role in ROLES if not roles[role].ready]
    if kv_secret_conflict:
        phase = "Failed"
        conditions = set_condition(conditions, "Ready", False, KV_SECRET_CONFLICT, kv_secret_conflict, now,
                                   generation)
    elif model is not None and model.ok is False:
        phase = "Failed"
        conditions = set_condition(conditions, "Ready", False, model.reason, model.message, now, generation)
    elif apply_error:
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
        rolling = all(roles[role].reason in ("RolloutPending", "RollingOut") for role in not_ready)
        if missing:
            phase = "Pending"
        elif was_ready and same_spec and not rolling:
            phase = "Degraded"
        else:
            phase = "Progressing"
        detail = "; ".join(roles[role].message for role in not_ready)
        conditions = set_condition(conditions, "Ready", False, f"{'And'.join(r.capitalize() for r in not_ready)}NotReady",
                                   detail, now, generation)
    status["phase"] = phase
    status["conditions"] = conditions
    if "autoscaler" in previous and not api.baton_autoscales(llmservice.get("spec")):
        # The autoscaler's persisted history (autoscaler_store): stale once autoscaling is off; switched on
        # again, it must start afresh (watch a whole scale-down window) rather than from a days-old history.
        status["autoscaler"] = None
    return status
