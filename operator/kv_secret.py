"""The KV-transfer secret of an LLMService: one random token per service, made by the operator.

Prefill and decode workers authenticate every KV hand-off with an HMAC keyed by ``BATON_KV_SECRET``; a worker
without it accepts any peer. So the operator creates ``<name>-kv`` (key ``token``, 32 random bytes,
url-safe) before the workers, and the worker pods require it. The token is never logged, never part of
``render`` (which is pure and deterministic) and never in an Event. Rotation: set or change the LLMService
annotation ``baton.dev/rotate-kv-secret``; a new secret ``<name>-kv-<hash of the value>`` is made and the worker
pods roll onto it (render names it). The operator only creates Secrets -- it cannot read, list or change one --
so earlier secrets stay until the LLMService is deleted (owner references). While the roll runs, a prefill and a decode pod may hold different tokens: the
hand-off is refused and the router recomputes the prompt on decode, so no request fails.
"""

from __future__ import annotations

import secrets

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


def ensure_kv_secret(kube: Kube, llmservice: dict) -> str | None:
    """Create the secret the worker pods refer to (`<name>-kv`, or the rotation's `<name>-kv-<hash>`) unless it
    exists. Create-only on purpose: the operator holds no right to read, list or change any Secret.

    Returns "created", "rotated" (created for a new rotation value) or None. The caller reports that word,
    never the token."""
    try:
        kube.create(secret_manifest(llmservice, new_token()))
    except KubeError as exc:
        if exc.status == 409:  # already there (made by an earlier reconcile)
            return None
        raise
    return "rotated" if requested_rotation(llmservice) else "created"
