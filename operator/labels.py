"""Label and annotation keys on everything Baton creates, and the label sets built from them.

Two sets matter:

* `common_labels` / `component_labels`: the full, descriptive set on every child object and pod template.
* `selector_labels`: the *stable* subset (instance + role) used in Deployment selectors and Service
  selectors. Deployment selectors are immutable, so this subset must never change for an existing
  LLMService; nothing version- or spec-dependent goes in it.

The reconciler finds (and prunes) children with `instance_selector(name)`: every child carries
`baton.dev/llmservice=<name>` and `app.kubernetes.io/managed-by=baton-operator`.

Pure: no I/O.
"""
from __future__ import annotations

from .naming import label_value

# ----------------------------------------------------------------------------------------------- keys
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_LLMSERVICE = "baton.dev/llmservice"
LABEL_ROLE = "baton.dev/role"
#: On worker pods: the engine they run (baton | vllm). The chart's PodMonitor reads it: a vLLM worker serves
#: /metrics on its HTTP port, a Baton worker on its metrics port (`launch.scrape_port_name`).
LABEL_ENGINE = "baton.dev/engine"

#: Values of the fixed labels.
APP_NAME = "baton"
MANAGED_BY = "baton-operator"
PART_OF = "baton"

#: Roles (values of `baton.dev/role`) and components (values of `app.kubernetes.io/component`).
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_ROUTER = "router"
WORKER_ROLES = (ROLE_PREFILL, ROLE_DECODE)
COMPONENT_CONFIG = "config"

# ------------------------------------------------------------------------------------------ annotations
#: On an LLMService: set (or change) to any value to rotate its KV-transfer secret; copied onto the worker pod
#: templates, so that the workers restart with the new secret.
ANNOTATION_ROTATE_KV_SECRET = "baton.dev/rotate-kv-secret"
#: On the KV Secret: the rotation value it was made for.
ANNOTATION_KV_SECRET_ROTATION = "baton.dev/kv-secret-rotation"


def common_labels(name: str, component: str) -> dict[str, str]:
    """Labels on every child of LLMService `name`; `component` is prefill|decode|router|config."""
    value = label_value(name)
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: value,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: PART_OF,
        LABEL_LLMSERVICE: value,
    }


def role_labels(name: str, role: str) -> dict[str, str]:
    """Labels on the objects (and pods) of one role: the common set plus `baton.dev/role`."""
    return {**common_labels(name, role), LABEL_ROLE: role}


def selector_labels(name: str, role: str) -> dict[str, str]:
    """The stable selector of one role's pods: instance + role. Never change this (selectors are immutable)."""
    return {LABEL_INSTANCE: label_value(name), LABEL_ROLE: role}


def instance_selector(name: str) -> dict[str, str]:
    """Selects every child of LLMService `name` managed by Baton (for listing and pruning)."""
    return {LABEL_LLMSERVICE: label_value(name), LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(labels: dict[str, str]) -> str:
    """`k1=v1,k2=v2`, as the API's `labelSelector` query parameter wants it."""
    return ",".join(f"{k}={v}" for k, v in labels.items())
