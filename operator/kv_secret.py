"""The KV-transfer secret of an LLMService: one random token per service, made by the operator.

Prefill and decode workers authenticate every KV hand-off with an HMAC keyed by ``BATON_KV_SECRET``; a worker
without it accepts any peer. So the operator creates ``<name>-kv`` (key ``token``, 32 random bytes,
url-safe) before the workers, and the worker pods require it. The token is never logged, never part of
``render`` (which is pure and deterministic) and never in an Event. Rotation: set or change the LLMService
annotation ``baton.dev/rotate-kv-secret``; a new secret ``<name>-kv-<hash of the value>`` is made and the worker
pods roll onto it (render names it). The operator only creates Secrets -- it cannot read, list or change one --
so earlier secrets stay until the LLMService is deleted (owner references). While the roll runs, a prefill and a decode pod may hold different tokens: the
hand-off is refused and the router recomputes the prompt on decode, so no request fails.

Whose Secret is it? The name is fixed, so anyone who may create Secrets in the namespace can make ``<name>-kv``
before the operator does, with a token they know -- and the operator, which may not read Secrets, gets only a
409 on its create. Reading the existing Secret's owner reference would need ``get`` on Secrets (RBAC has no
metadata-only verb, so that is every Secret's data in every namespace the operator manages), so ownership is
proven by the operator's own record instead: right after a create succeeds it writes the new Secret's name
and uid into ``status.kvSecrets`` (a field only holders of ``llmservices/status`` can write). A 409 counts as
its own Secret only when that record lists the name; otherwise it is a conflict: condition KVSecretReady=False
(reason KVSecretConflict), a Warning Event, and the reconciler does not start workers with that Secret (their
Deployments are neither created nor changed). An LLMService last reconciled by an operator without the record
(status.observedGeneration set, no status.kvSecrets) has its current KV Secret adopted once, as before. A
crash between the create and the record (one API call apart) looks like a conflict afterwards; deleting the
Secret, or a new rotation value, lets the operator make a new one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from .api import API_VERSION, KIND
from .kube import Kube, KubeError
from .labels import (
    ANNOTATION_KV_SECRET_ROTATION,
    ANNOTATION_ROTATE_KV_SECRET,
    COMPONENT_CONFIG,
    common_labels,
)
from .naming import KV_SECRET_KEY, kv_secret_name

TOKEN_BYTES = 32


def requested_rotation(llmservice: dict) -> str:
    return ((llmservice.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ROTATE_KV_SECRET, "")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def secret_manifest(llmservice: dict, token: str) -> dict:
    """The Secret (owned by the LLMService, so it goes with it) holding `token`."""
    meta = llmservice["metadata"]
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": kv_secret_name(meta["name"], requested_rotation(llmservice)),
            "namespace": meta.get("namespace"),
            "labels": common_labels(meta["name"], COMPONENT_CONFIG),
            "annotations": {ANNOTATION_KV_SECRET_ROTATION: requested_rotation(llmservice)},
        },
        "stringData": {KV_SECRET_KEY: token},
    }
    if meta.get("uid"):
        manifest["metadata"]["ownerReferences"] = [{
            "apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True,
        }]
    return manifest


#: ensure_kv_secret's outcomes
CREATED, ROTATED, OURS, ADOPTED, CONFLICT = "created", "rotated", "ours", "adopted", "conflict"


@dataclass(frozen=True)
class KVSecretOutcome:
    name: str
    state: str  # CREATED | ROTATED (created for a new rotation value) | OURS | ADOPTED | CONFLICT
    message: str = ""


def recorded(llmservice: dict) -> dict[str, str] | None:
    """status.kvSecrets: the KV Secrets this operator made for this LLMService (None: never recorded)."""
    records = (llmservice.get("status") or {}).get("kvSecrets")
    return dict(records) if isinstance(records, dict) else None


def conflict_message(namespace: str, name: str) -> str:
    return (f"Secret {namespace}/{name} already exists but was not made by this operator for this LLMService "
            f"(status.kvSecrets does not list it): its token may be known to whoever made it, so no worker is "
            f"started with it. Delete the Secret (the operator then makes its own) or set the annotation "
            f"{ANNOTATION_ROTATE_KV_SECRET} to a new value (a new Secret name).")


def ensure_kv_secret(kube: Kube, llmservice: dict) -> KVSecretOutcome:
    """Create the secret the worker pods refer to (`<name>-kv`, or the rotation's `<name>-kv-<hash>`) unless it
    exists, and say whether the one that exists is ours (module docstring). Create-only on purpose: the
    operator holds no right to read, list or change any Secret. The caller reports the outcome, never the
    token."""
    meta = llmservice["metadata"]
    namespace, service = meta.get("namespace"), meta["name"]
    name = kv_secret_name(service, requested_rotation(llmservice))
    records = recorded(llmservice)
    try:
        created = kube.create(secret_manifest(llmservice, new_token()))
    except KubeError as exc:
        if exc.status != 409:
            raise
        if records is not None and name in records:
            return KVSecretOutcome(name, OURS)  # made by an earlier reconcile
        status = llmservice.get("status") or {}
        if records is None and status.get("observedGeneration") is not None:
            # reconciled before by an operator that kept no record: it made the Secret its workers use
            kube.patch_llmservice_status(namespace, service, {"kvSecrets": {name: ""}})
            return KVSecretOutcome(name, ADOPTED)
        if records is None:  # from now on only recorded Secrets count (no adoption after a conflict)
            kube.patch_llmservice_status(namespace, service, {"kvSecrets": {}})
        return KVSecretOutcome(name, CONFLICT, conflict_message(namespace or "default", name))
    # Recorded at once, before anything else can fail: the next reconcile's 409 must find it.
    uid = str((created.get("metadata") or {}).get("uid") or "")
    kube.patch_llmservice_status(namespace, service, {"kvSecrets": {name: uid}})
    return KVSecretOutcome(name, ROTATED if requested_rotation(llmservice) else CREATED)
