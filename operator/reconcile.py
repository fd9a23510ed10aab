"""Reconcile one LLMService: apply its rendered children, prune strays, adopt replicas, write status.

Everything here is level-triggered and idempotent: it reads the LLMService as it is now, so the same function
serves kopf's create/update/resume handlers, child-object events (drift) and operator restarts. Decisions
are made by pure functions (`render`, `compute_status`, `initial_replicas`); this module only does I/O.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from baton.operator import kv_secret
from baton.operator.api import AUTOSCALING_BATON, AUTOSCALING_EXTERNAL, autoscaling_mode
from baton.operator.kube import AUTOSCALER_FIELD_MANAGER, FIELD_MANAGER, GROUP, VERSION, Kube, KubeError
from baton.operator.kv_secret import ensure_kv_secret
from baton.operator.labels import LABEL_ROLE, WORKER_ROLES, instance_selector, selector_string
from baton.operator.model_fetch_status import model_fetch_state
from baton.operator.naming import role_name
from baton.operator.planner.overlay import effective
from baton.operator.render import render
from baton.operator.status import compute_status

log = logging.getLogger("baton.operator")

#: Kinds the operator creates; listed to find children that a spec change made obsolete.
CHILD_KINDS = (
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
ALL_ROLES = ("prefill", "decode", "router")

#: Called for each action worth a Kubernetes Event: (event type "Normal"/"Warning", reason, message).
EventSink = Callable[[str, str, str], None]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _role_of(obj: dict) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_ROLE)


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def is_subset(desired: object, live: object) -> bool:
    """Whether every field of `desired` has the same value in `live` (which may hold more: defaults, status).

    Lets the reconciler skip applying children that already match, so a resync costs reads, not writes
    (and Kubernetes 1.20 would otherwise bump some objects' resourceVersion on a no-op apply).
    """
    if isinstance(desired, dict):
        # The apiserver omits false/empty optional fields, so a missing key matches such a desired value.
        return isinstance(live, dict) and all(
            is_subset(v, live[k]) if k in live else v in (False, None, "", [], {}) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(desired) == len(live)
                and all(is_subset(d, item) for d, item in zip(desired, live)))
    return desired == live


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


#: Field manager of the one server-side apply that hands a Deployment's `spec.replicas` over to an outside
#: autoscaler (mode external), with the value it already has: the pattern of the Kubernetes docs (server-side
#: apply, "Transferring ownership"), so that `baton-operator` dropping the field does not reset it to 1.
HANDOVER_FIELD_MANAGER = "baton-handover"


def replicas_managers(deployment: dict) -> set[str]:
    """The field managers that own the Deployment's `spec.replicas` (from its managedFields)."""
    return {entry.get("manager") or "" for entry in (deployment.get("metadata") or {}).get("managedFields") or []
            if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})}


def autoscaler_owns_replicas(deployment: dict) -> bool:
    """Whether the autoscaler's field manager already owns `spec.replicas` (so dropping ours keeps it)."""
    return AUTOSCALER_FIELD_MANAGER in replicas_managers(deployment)


def initial_replicas(mode: str, spec_replicas: int, low: int, high: int) -> int:
    """The replicas a worker Deployment is created with when render leaves them out (mode baton or external):
    the spec's, clamped into [min, max] for Baton's autoscaler; as written for an outside one (its own bounds
    apply from its first decision on)."""
    return clamp(spec_replicas, low, high) if mode == AUTOSCALING_BATON else spec_replicas


def replicas_handover(mode: str, deployment: dict, low: int, high: int) -> tuple[int, str] | None:
    """What to server-side-apply to a live worker Deployment's `spec.replicas` before the reconciler applies a
    manifest without them: (replicas, field manager), or None for nothing. Pure.

    - off: None (render writes the spec's replicas as `baton-operator`).
    - baton: the autoscaler's manager must own the field, with a value in [min, max]: the live value, clamped
      (so a manual `kubectl scale` inside the bounds stays; outside them it is clamped).
    - external: the reconciler never changes the value. Only while `baton-operator` is the field's sole owner
      (the Deployment was created, or last reconciled with mode off) is the live value applied once as
      `baton-handover`, so that the next apply without replicas releases the field instead of deleting it
      (which would reset it to 1). Once anyone else owns it (the handover, HPA, KEDA, `kubectl scale`): None.
    """
    current = int((deployment.get("spec") or {}).get("replicas", 1))
    if mode == AUTOSCALING_BATON:
        target = clamp(current, low, high)
        if autoscaler_owns_replicas(deployment) and target == current:
            return None
        return target, AUTOSCALER_FIELD_MANAGER
    if mode == AUTOSCALING_EXTERNAL:
        if replicas_managers(deployment) == {FIELD_MANAGER}:
            return current, HANDOVER_FIELD_MANAGER
        return None
    return None


@dataclass
class ReconcileResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    error: str | None = None


def _autoscaling(spec: dict, role: str) -> tuple[str, int, int]:
    limits = (spec.get(role) or {}).get("autoscaling") or {}
    return autoscaling_mode(spec, role), int(limits.get("minReplicas", 1)), int(limits.get("maxReplicas", 8))


def _hand_replicas_over(kube: Kube, llmservice: dict, deployment: dict, role: str) -> int | None:
    """Make someone other than `baton-operator` own `spec.replicas` while render leaves them out (modes baton
    and external; see `replicas_handover`).

    `render` leaves replicas out unless the mode is off, so the reconciler never fights an autoscaler. A field
    nobody owns any more would be reset to its default by the apiserver, so ownership is handed over
    explicitly: at creation and when the mode changes. Returns the replicas applied, or None.
    """
    mode, low, high = _autoscaling(llmservice["spec"], role)
    action = replicas_handover(mode, deployment, low, high)
    if action is None:
        return None
    target, manager = action
    meta = deployment["metadata"]
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "spec": {"replicas": target}}, field_manager=manager)
    return target


def reconcile(kube: Kube, namespace: str, name: str, emit: EventSink | None = None) -> ReconcileResult | None:
    """Bring the children of `namespace/name` in line with its spec and write its status.

    Returns None when the LLMService no longer exists (deleted meanwhile: garbage collection removes the
    children through their owner references).
    """
    emit = emit or (lambda *_: None)
    llmservice = kube.get(f"{GROUP}/{VERSION}", "LLMService", namespace, name)
    if llmservice is None or (llmservice.get("metadata") or {}).get("deletionTimestamp"):
        return None
    # spec.planner apply: the applied plan's layout laid over the spec (the spec itself stays the user's)
    llmservice = effective(llmservice)
    result = ReconcileResult()

    existing: dict[tuple[str, str, str], dict] = {}
    for api_version, kind in CHILD_KINDS:
        for obj in kube.list(api_version, kind, namespace, selector_string(instance_selector(name))):
            obj.setdefault("apiVersion", api_version)
            obj.setdefault("kind", kind)
            existing[_key(obj)] = obj

    deployments: dict[str, dict | None] = {role: None for role in ALL_ROLES}
    kv_conflict: str | None = None
    try:
        manifests = render(llmservice)
        # before the workers, which require it; the token itself is never logged nor put in an Event
        secret = ensure_kv_secret(kube, llmservice)
        wanted = {_key(m) for m in manifests}
        if secret.state == kv_secret.CREATED:
            result.created.append(f"Secret/{secret.name}")
        elif secret.state == kv_secret.ROTATED:
            emit("Normal", "KVSecretRotated", f"made Secret/{secret.name}; the workers roll onto it")
        elif secret.state == kv_secret.ADOPTED:
            log.info("%s/%s: KV Secret %s recorded as this operator's (made before status.kvSecrets existed)",
                     namespace, name, secret.name)
        elif secret.state == kv_secret.CONFLICT:
            kv_conflict = secret.message
            if not _conflict_reported(llmservice, kv_conflict):
                emit("Warning", "KVSecretConflict", kv_conflict)
            manifests, held = _without_workers(manifests)
            # Held, not pruned: existing workers keep the Secret they started with, none is created.
            for key in held:
                if key in existing:
                    deployments[_role_of(existing[key]) or ""] = existing[key]
        for manifest in manifests:
            key = _key(manifest)
            before = existing.get(key)
            if (before is None and manifest["kind"] == "Deployment" and _role_of(manifest) in WORKER_ROLES
                    and "replicas" not in manifest["spec"]):
                # Created while an autoscaler owns replicas: start at the spec's replica count (clamped for Baton's).
                role = _role_of(manifest)
                mode, low, high = _autoscaling(llmservice["spec"], role)
                start = initial_replicas(mode, int(llmservice["spec"].get(role, {}).get("replicas", 1)), low, high)
                manifest = {**manifest, "spec": {**manifest["spec"], "replicas": start}}
            if (before is not None and manifest["kind"] == "Deployment"
                    and _role_of(manifest) in WORKER_ROLES and "replicas" not in manifest["spec"]):
                _hand_replicas_over(kube, llmservice, before, _role_of(manifest))
            if before is not None and is_subset(manifest, before):
                after = before  # already as wanted: no write
            else:
                after = kube.apply(manifest)
            label = f"{manifest['kind']}/{manifest['metadata']['name']}"
            if before is None:
                result.created.append(label)
                if manifest["kind"] == "Deployment" and _role_of(manifest) in WORKER_ROLES:
                    _hand_replicas_over(kube, llmservice, after, _role_of(manifest))
            elif (before.get("metadata") or {}).get("resourceVersion") != after["metadata"].get("resourceVersion"):
                result.updated.append(label)
            if manifest["kind"] == "Deployment":
                deployments[_role_of(manifest) or ""] = after
        for key, obj in existing.items():
            if key not in wanted:
                kube.delete(key[0], key[1], namespace, key[2])
                result.deleted.append(f"{key[1]}/{key[2]}")
    except KubeError as exc:
        result.error = f"applying children failed: {exc}"
        for role in ALL_ROLES:
            deployments[role] = deployments[role] or existing.get(("apps/v1", "Deployment", role_name(name, role)))

    for label in result.created:
        emit("Normal", "Created", f"created {label}")
    for label in result.updated:
        emit("Normal", "Updated", f"updated {label} to match the LLMService spec")
    for label in result.deleted:
        emit("Normal", "Deleted", f"deleted {label}, no longer part of the spec")
    if result.error:
        emit("Warning", "ApplyFailed", result.error)

    model = None
    if ((llmservice.get("spec") or {}).get("model") or {}).get("source", {}).get("uri"):
        try:  # the download runs in the worker pods' init containers: their termination messages say why
            pods = kube.list("v1", "Pod", namespace, selector_string(instance_selector(name)))
            model = model_fetch_state(pods)
        except KubeError as exc:
            log.warning("cannot read the pods of %s/%s for the model download's state: %s", namespace, name, exc)
    status = compute_status(llmservice, deployments, now_rfc3339(), apply_error=result.error, model=model,
                            kv_secret_conflict=kv_conflict)
    if kv_secret.recorded(llmservice) is None:
        # Marks the status as written by an operator that keeps the record (kv_secret.py: no late adoption).
        status["kvSecrets"] = {}
    previous = llmservice.get("status") or {}
    if previous.get("phase") != status["phase"]:
        emit("Normal" if status["phase"] in ("Ready", "Progressing", "Pending") else "Warning",
             f"Phase{status['phase']}", f"phase {previous.get('phase') or 'None'} -> {status['phase']}")
    if _status_changed(previous, status):
        kube.patch_llmservice_status(namespace, name, status)
    result.status = status
    return result


def _without_workers(manifests: list[dict]) -> tuple[list[dict], set[tuple[str, str, str]]]:
    """The manifests less the worker Deployments (the pods that would read the KV Secret), and their keys."""
    held = {_key(m) for m in manifests if m["kind"] == "Deployment" and _role_of(m) in WORKER_ROLES}
    return [m for m in manifests if _key(m) not in held], held


def _conflict_reported(llmservice: dict, message: str) -> bool:
    """Whether status already says so (the Warning Event goes out once per conflict, not every resync)."""
    for cond in (llmservice.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "KVSecretReady":
            return cond.get("status") == "False" and cond.get("message") == message
    return False


def _status_changed(previous: dict, status: dict) -> bool:
    # A subset test: fields others own (the autoscaler's lastScale*, slo) must not make every reconcile write.
    return not is_subset(status, previous)
