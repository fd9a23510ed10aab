"""Admission review for LLMService: the rules a Kubernetes 1.20 CRD schema cannot express.

The kopf validating webhook calls `review` and refuses the request when it returns problems. The schema in
the CRD already enforces types, enums and ranges; this adds what needs code (no CEL before 1.25): powers of
two, min <= max, exactly one model source, durations, `prometheusURL` when autoscaling is on, requests <=
limits, names short enough for their children, engine args that collide with the launch contract. All of it lives in the pydantic validators of `api.py`, so
the operator, `baton` and the webhook agree on one definition; this module adds the rules about *changes*, and
one about pods only (`baton up` runs processes): a vLLM service names its image.

Pure: no I/O, never raises (an exception in a webhook becomes an opaque 500 for the user).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from baton.operator.api import validation_errors

#: What `baton up` (local processes) does not need but a pod does: an image that has the engine.
VLLM_IMAGE_REQUIRED = ("spec.engine.image: is required with engine.kind vllm (Baton's worker image has no vLLM): "
                       "e.g. a vllm/vllm-openai tag")


def review(body: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
    """Problems with a CREATE (`old` is None) or UPDATE of an LLMService, as `field.path: message` lines.

    Two update rules keep the webhook from wedging objects:
    * an object being deleted (`metadata.deletionTimestamp` set) is never refused, so finalizers can be
      removed even if the object no longer passes today's rules;
    * an update that leaves `spec` unchanged (labels, annotations, finalizers) is not refused for spec
      problems: the spec was accepted before, perhaps by an older Baton, and the operator must still be able
      to manage it. Metadata problems are reported as usual.
    """
    try:
        return _review(body, old)
    except Exception as exc:  # noqa: BLE001 - a message, never a traceback
        return [f"body: could not be reviewed: {type(exc).__name__}: {exc}"]


def _review(body: Mapping[str, Any], old: Mapping[str, Any] | None) -> list[str]:
    if not isinstance(body, Mapping):
        return [f"body: must be an object (mapping), got {type(body).__name__}"]
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("deletionTimestamp"):
        return []
    problems = validation_errors(body)
    engine = (body.get("spec") or {}).get("engine") if isinstance(body.get("spec"), Mapping) else None
    if isinstance(engine, Mapping) and engine.get("kind") == "vllm" and not engine.get("image"):
        problems.append(VLLM_IMAGE_REQUIRED)
    if old is not None and isinstance(old, Mapping) and old.get("spec") == body.get("spec"):
        problems = [p for p in problems if not p.startswith("spec.") and not p.startswith("spec:")]
    return problems
