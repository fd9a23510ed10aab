"""Render an LLMService into the Kubernetes objects that serve it.

`render(llmservice)` is a pure function: the LLMService object as the apiserver returns it in, a list of
child manifests out, always in the same order and with the same content for the same input (no clocks, no
randomness, no I/O, no kopf). The reconciler applies them with server-side apply and prunes whatever
`child_keys` no longer lists.

Children of LLMService `<name>` in namespace `<ns>` (see `naming` for names that would not fit):

    ServiceAccount  <name>            identity of all pods (worker pods do not mount its token)
    Role            <name>-router     `get` on the two role Endpoints (the router's discovery)
    RoleBinding     <name>-router     that Role -> the ServiceAccount
    Service         <name>-prefill    headless, ports http (role port, 8000) + kv (kvTransfer.port)
    Service         <name>-decode     headless, ports http + kv
    Service         <name>            ClusterIP, port 80 -> router http: the client endpoint
    NetworkPolicy   <name>-prefill    ingress of each role's pods (render_network.py; unless switched off),
    NetworkPolicy   <name>-decode       before the Deployments so that pods start behind them
    NetworkPolicy   <name>-router
    Deployment      <name>-prefill    prefill workers
    Deployment      <name>-decode     decode workers
    Deployment      <name>-router     the router (orchestrates prefill -> decode, measures TTFT/TPOT)

Decisions worth knowing:

* A role whose autoscaling mode is `baton` or `external` (`spec.<role>.autoscaling.mode`, else
  `spec.autoscaling.mode`, else `enabled`) has a Deployment without `spec.replicas`: Baton's autoscaler or an
  outside one (HPA, KEDA, `kubectl scale`) owns that field, and server-side apply of these manifests must never
  reset it (the reconciler hands the field over first: `reconcile.replicas_handover`). Only mode `off` renders
  the spec's replicas. The router is not autoscaled.
* Every setting a pod reads is on its command line or in its environment (the launch contract), so a pod
  template changes exactly when a pod would run differently: an SLO edit (read only by the operator's
  autoscaler) or a replica count rolls nothing; an engine argument rolls the workers, not the router. There
  is no ConfigMap: nobody would read it, and a hash of it rolled pods for settings they never used.
* GPUs: `nvidia.com/gpu` = tensorParallel in limits and requests, unless the user set a larger limit
  (the API allows limits >= tensorParallel); requests always equal limits, as extended resources require.
* CPU services (`spec.accelerator: cpu`, the default for the Baton engine) request no GPU; `OMP_NUM_THREADS`
  comes from the container's CPU limit through the downward API (unset, the limit is the CPU request rounded
  up, else 1).
* Readiness: Baton's worker serves `/ready`; vLLM has no `/ready` and its `/health` only answers once the
  model is loaded, so vLLM pods use `/health` for readiness too. Startup probes allow 30 minutes to load.
* Draining: a Baton worker's KV lease and `--drain-timeout` are rendered on its command line and its
  `terminationGracePeriodSeconds` is that drain timeout plus slack, all from one budget in the launch contract
  (`launch.with_drain`, `termination_grace_seconds`): prefill 60 s + 10, decode 110 s + 10 by default; a
  `--drain-timeout` or `--kv-lease-seconds` in the engine or role args moves the grace period with it. vLLM
  pods get the same budget as `--shutdown-timeout` (vLLM drains in-flight requests instead of aborting them) and
  sleep in a preStop hook first so the endpoint removal reaches the routers; their grace period covers both.
* Images: the router and the model-fetch init container run `spec.router.image`, else (Baton engine) the
  workers' `spec.engine.image`, else the operator's worker image (`--worker-image`, Helm value `workerImage`),
  as do Baton workers without `spec.engine.image`; every pod
  gets `spec.imagePullSecrets` plus the operator's (`images.py`). vLLM with kvTransfer rdma/auto: UCX env,
  RDMA device and IPC_LOCK (`render_vllm.py`).
* `uri` models: fetched once per node into the node model cache (hostPath --model-cache-path; or a PVC, or
  an emptyDir per pod with `cache.mode: none`); the worker mounts its entry read-only (`model_cache.py`).
* Baton pods run as uid 1000 (non-root, all capabilities dropped); vLLM pods keep the image's user (the
  upstream image runs as root and writes caches under /root), still without privilege escalation.
* `enableServiceLinks: false`: a Service named e.g. `vllm` in the namespace would otherwise inject
  `VLLM_PORT=tcp://...`, which vLLM reads as its own setting and fails on.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from baton import launch
from baton.launch import Env

from . import images, model_cache, render_network, render_vllm, tracing
from .api import (
    ACCELERATOR_CPU,
    ACCELERATOR_GPU,
    API_VERSION,
    AUTOSCALING_OFF,
    GPU_RESOURCE,
    KIND,
    InvalidLLMService,
    LLMService,
    RoleSpec,
    parse_llmservice,
)
from .images import ImageOptions
from .labels import (
    ANNOTATION_ROTATE_KV_SECRET,
    COMPONENT_CONFIG,
    LABEL_ENGINE,
    ROLE_DECODE,
    ROLE_PREFILL,
    ROLE_ROUTER,
    WORKER_ROLES,
    common_labels,
    role_labels,
    selector_labels,
)
from .naming import (
    KV_SECRET_KEY,
    kv_secret_name,
    role_name,
    router_deployment_name,
    router_service_name,
    service_account_name,
)
from .planner.overlay import effective
from .units import Quantity

# --------------------------------------------------------------------------------------------- constants
ROUTER_SERVICE_PORT = 80

MODEL_MOUNT = "/models"

RUN_AS_USER = 1000
#: A new worker pod counts as available (and an old one is only then removed by a rollout) after being Ready
#: this long: more than the routers need to discover it (Endpoints poll, 2 s) and health-check it.
WORKER_MIN_READY_SECONDS = 10
#: Startup probe budget for model loading: period x failureThreshold = 10 s x 180 = 30 minutes.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 180
#: The router's startup budget, 2 s x 150 = 5 minutes: on a CPU-starved node its Python start can outlast the
#: liveness probe's 30 s, and without a startupProbe the kubelet kills a router that is still starting -- each
#: restart a window in which its Service has no endpoint and every client connection is refused.
ROUTER_STARTUP_PERIOD_SECONDS = 2
ROUTER_STARTUP_FAILURE_THRESHOLD = 150
WORKER_PROGRESS_DEADLINE = 1800
ROUTER_PROGRESS_DEADLINE = 600
REVISION_HISTORY_LIMIT = 3
ROUTER_DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}}
#: One extra pod during a rollout, never one fewer: serving capacity is kept (needs one spare slot).
ROLLING_UPDATE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}

TOPOLOGY_KEYS = {"zone": "topology.kubernetes.io/zone", "node": "kubernetes.io/hostname"}

#: (apiVersion, kind, namer) of every child, in render order.
CHILDREN: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("v1", "ServiceAccount", service_account_name),
    ("rbac.authorization.k8s.io/v1", "Role", router_deployment_name),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", router_deployment_name),
    ("v1", "Service", lambda n: role_name(n, ROLE_PREFILL)),
    ("v1", "Service", lambda n: role_name(n, ROLE_DECODE)),
    ("v1", "Service", router_service_name),
    (render_network.NETWORK_API, "NetworkPolicy", lambda n: role_name(n, ROLE_PREFILL)),
    (render_network.NETWORK_API, "NetworkPolicy", lambda n: role_name(n, ROLE_DECODE)),
    (render_network.NETWORK_API, "NetworkPolicy", router_deployment_name),
    ("apps/v1", "Deployment", lambda n: role_name(n, ROLE_PREFILL)),
    ("apps/v1", "Deployment", lambda n: role_name(n, ROLE_DECODE)),
    ("apps/v1", "Deployment", router_deployment_name),
)


# --------------------------------------------------------------------------------------------- helpers
def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object that does not depend on dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _role(svc: LLMService, role: str) -> RoleSpec:
    return svc.spec.prefill if role == ROLE_PREFILL else svc.spec.decode


def model_dir(svc: LLMService) -> str:
    """Where the weights are inside worker pods: /models, or /models/<path> for a sub-directory of a PVC."""
    source = svc.spec.model.source
    path = source.pvc.path.strip("/") if source.pvc is not None else ""
    return f"{MODEL_MOUNT}/{path}" if path else MODEL_MOUNT


def router_image(svc: LLMService, opts: ImageOptions | None = None) -> str:
    """The router (and model-fetch) image: `images.router_image` (spec.router.image, else a Baton service's
    engine.image, else the operator's worker image)."""
    return images.router_image(svc.spec, opts or images.OPTIONS)


def _engine_image(svc: LLMService, opts: ImageOptions) -> str:
    image = images.engine_image(svc.spec, opts)
    if image is None:
        from .admission import VLLM_IMAGE_REQUIRED  # the webhook refuses it; an object admitted without it
        raise InvalidLLMService([VLLM_IMAGE_REQUIRED])
    return image


def _pull_secrets(svc: LLMService, opts: ImageOptions, pod_spec: dict) -> None:
    secrets = images.pull_secrets(svc.spec, opts)
    if secrets:
        pod_spec["imagePullSecrets"] = secrets


def _metadata(svc: LLMService, name: str, labels: dict[str, str],
              annotations: dict[str, str] | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": svc.namespace, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    if svc.metadata.uid:
        meta["ownerReferences"] = [owner_reference(svc)]
    return meta


def owner_reference(svc: LLMService) -> dict:
    """Controller reference to the LLMService: garbage collection deletes children with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": svc.name,
        "uid": svc.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _service_account(svc: LLMService) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(svc, service_account_name(svc.name), common_labels(svc.name, COMPONENT_CONFIG)),
    }


RBAC_API = "rbac.authorization.k8s.io/v1"
#: what the router reads from the apiserver: the Endpoints of its two role Services, by name (discovery)
ROUTER_DISCOVERY_VERBS = ("get",)


def _router_role(svc: LLMService) -> dict:
    """Least privilege for the router's discovery: `get` on exactly the two Endpoints objects it polls.
    (The operator must hold these verbs itself to grant them: the chart gives it `get` on endpoints.)"""
    return {
        "apiVersion": RBAC_API,
        "kind": "Role",
        "metadata": _metadata(svc, router_deployment_name(svc.name), common_labels(svc.name, COMPONENT_CONFIG)),
        "rules": [{
            "apiGroups": [""],
            "resources": ["endpoints"],
            "resourceNames": [role_name(svc.name, ROLE_PREFILL), role_name(svc.name, ROLE_DECODE)],
            "verbs": list(ROUTER_DISCOVERY_VERBS),
        }],
    }


def _router_role_binding(svc: LLMService) -> dict:
    """Binds the router Role to the LLMService's ServiceAccount (worker pods run as it too, but do not mount
    its token: only the router can use the grant)."""
    return {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": _metadata(svc, router_deployment_name(svc.name), common_labels(svc.name, COMPONENT_CONFIG)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": router_deployment_name(svc.name)},
        "subjects": [{"kind": "ServiceAccount", "name": service_account_name(svc.name),
                      "namespace": svc.namespace}],
    }


# -------------------------------------------------------------------------------------------- services
def _headless_service(svc: LLMService, role: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(svc, role_name(svc.name, role), role_labels(svc.name, role)),
        "spec": {
            # publishNotReadyAddresses stays unset (false): only ready workers are discovered. Writing the
            # default explicitly would differ from the stored object, which omits false booleans.
            "clusterIP": "None",
            "selector": selector_labels(svc.name, role),
            "ports": [
                {"name": "http", "port": _role(svc, role).port, "targetPort": "http", "protocol": "TCP"},
                {"name": "kv", "port": svc.spec.kv_transfer.port, "targetPort": "kv", "protocol": "TCP"},
            ],
        },
    }


def _router_service(svc: LLMService) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(svc, router_service_name(svc.name), role_labels(svc.name, ROLE_ROUTER)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(svc.name, ROLE_ROUTER),
            "ports": [{"name": "http", "port": ROUTER_SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# --------------------------------------------------------------------------------------------- workers
def locality_affinity(svc: LLMService, role: str) -> dict:
    """Pod affinity that keeps this LLMService's prefill and decode pods close (kvTransfer.locality).

    `zone`/`node`: decode pods *require* a prefill pod of this LLMService in the same zone/node (KV pulls
    would cross that boundary otherwise); prefill pods *prefer* decode pods there (a hard rule both ways
    would deadlock the first pod). `any`: nothing.
    """
    key = TOPOLOGY_KEYS.get(svc.spec.kv_transfer.locality)
    if key is None:
        return {}
    if role == ROLE_DECODE:
        term = {"labelSelector": {"matchLabels": selector_labels(svc.name, ROLE_PREFILL)}, "topologyKey": key}
        return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    term = {"labelSelector": {"matchLabels": selector_labels(svc.name, ROLE_DECODE)}, "topologyKey": key}
    return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}


def merge_affinity(user: dict | None, extra: dict) -> dict:
    """The user's affinity plus Baton's: term lists are concatenated (user's first), nothing is dropped.

    Baton only adds pod affinity terms (ANDed by the scheduler), never required node affinity terms (which
    are ORed and would widen the user's rule). The input is not modified.
    """
    out: dict = copy.deepcopy(user) if user else {}
    for kind, rules in extra.items():
        target = out.setdefault(kind, {})
        for when, terms in rules.items():
            target[when] = list(target.get(when) or []) + copy.deepcopy(list(terms))
    return out


def gpu_count(r: RoleSpec) -> int:
    """GPUs per worker pod: tensorParallel, or the user's larger `nvidia.com/gpu` limit."""
    limit = r.resources.limits.get(GPU_RESOURCE)
    if limit is not None and limit.value > r.tensor_parallel:
        return int(limit.value)
    return r.tensor_parallel


def _quantities(values: dict[str, Quantity]) -> dict[str, str]:
    return {k: str(values[k]) for k in sorted(values)}


def _worker_resources(svc: LLMService, r: RoleSpec) -> dict:
    limits, requests = _quantities(r.resources.limits), _quantities(r.resources.requests)
    if svc.spec.effective_accelerator() == ACCELERATOR_CPU and "cpu" not in limits:
        limits["cpu"] = str(default_cpu_limit(r))
    if svc.spec.effective_accelerator() == ACCELERATOR_GPU:
        gpus = str(gpu_count(r))
        limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = gpus
    out = {"limits": dict(sorted(limits.items()))}
    if requests:
        out["requests"] = dict(sorted(requests.items()))
    return out


def default_cpu_limit(r: RoleSpec) -> int:
    """A CPU worker's limit when the user set none: its CPU request rounded up, else 1 (threads = limit)."""
    request = r.resources.requests.get("cpu")
    return max(1, math.ceil(request.value)) if request is not None else 1


def _threads_env(svc: LLMService) -> list[dict]:
    """CPU services: torch's threads = the container's CPU limit (rounded up by the downward API), never the
    node's core count that torch would otherwise see."""
    if svc.spec.effective_accelerator() != ACCELERATOR_CPU:
        return []
    return [{"name": Env.THREADS, "valueFrom": {"resourceFieldRef": {
        "containerName": "worker", "resource": "limits.cpu", "divisor": "1"}}}]


def _router_resources(svc: LLMService) -> dict:
    res = svc.spec.router.resources
    if not res.limits and not res.requests:
        return copy.deepcopy(ROUTER_DEFAULT_RESOURCES)
    out: dict = {}
    if res.limits:
        out["limits"] = _quantities(res.limits)
    if res.requests:
        out["requests"] = _quantities(res.requests)
    return out


def _downward(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _common_env(svc: LLMService, role: str) -> list[dict]:
    return [
        {"name": Env.LLMSERVICE, "value": svc.name},
        _downward(Env.NAMESPACE, "metadata.namespace"),
        {"name": Env.ROLE, "value": role},
        {"name": Env.MODEL_NAME, "value": svc.spec.model.name},
        _downward(Env.POD_NAME, "metadata.name"),
        _downward(Env.POD_IP, "status.podIP"),
    ]


def _worker_env(svc: LLMService, role: str) -> list[dict]:
    kv = svc.spec.kv_transfer
    env = _common_env(svc, role) + [
        {"name": Env.KV_TRANSPORT, "value": kv.transport},
        {"name": Env.KV_PORT, "value": str(kv.port)},
        {"name": Env.KV_SECRET, "valueFrom": {"secretKeyRef": {
            # required: the operator creates it before the workers; a worker without it accepts any KV peer
            "name": kv_secret_name(svc.name, (svc.metadata.annotations or {}).get(ANNOTATION_ROTATE_KV_SECRET, "")),
            "key": KV_SECRET_KEY}}},
    ]
    if svc.spec.engine.kind == "vllm":
        # NIXL's side channel (handshake) listens on the KV port; $(POD_IP) expands from the entry above.
        env += [
            {"name": Env.VLLM_NIXL_SIDE_CHANNEL_HOST, "value": f"$({Env.POD_IP})"},
            {"name": Env.VLLM_NIXL_SIDE_CHANNEL_PORT, "value": str(kv.port)},
        ]
    env += _threads_env(svc)
    env += [{"name": k, "value": v}
            for k, v in launch.worker_env(worker_launch(svc, role)).items()]
    for var in svc.spec.engine.env:
        env.append(var.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True))
    return env


def worker_launch(svc: LLMService, role: str) -> launch.WorkerLaunch:
    """The launch contract of a worker pod: listens on the pod IP, serves `spec.model.name`; a Baton worker gets
    its drain budget (KV lease, --drain-timeout) rendered, the one its grace period is sized from."""
    spec = svc.spec
    r = _role(svc, role)
    return launch.with_drain(launch.WorkerLaunch(
        engine=spec.engine.kind,
        role=role,
        model_path=model_dir(svc),
        served_model_name=spec.model.name,
        port=r.port,
        host=launch.POD_LISTEN_HOST,
        kv_port=spec.kv_transfer.port,
        tensor_parallel=r.tensor_parallel,
        max_model_len=spec.model.max_model_len,
        kv_buffer_device="cpu" if spec.effective_accelerator() == ACCELERATOR_CPU else None,
        extra_args=(*spec.engine.args, *r.extra_args),
        otlp_traces_endpoint=tracing.otlp_endpoint(svc),
        metrics_port=launch.DEFAULT_METRICS_PORT if spec.engine.kind == launch.ENGINE_BATON else None,
    ))


def worker_command(svc: LLMService, role: str) -> tuple[list[str], list[str]]:
    """(command, args) of a worker container; engine.args then the role's extraArgs come last."""
    return launch.split_command(launch.worker_argv(worker_launch(svc, role)))


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _readiness_probe(path: str) -> dict:
    """A worker's readinessProbe: the launch contract's WORKER_READINESS, which the router counts with too."""
    t = launch.WORKER_READINESS
    return _probe(path, t.period_seconds, t.failure_threshold, t.timeout_seconds) | {
        "successThreshold": t.success_threshold}


def _container_security(non_root: bool) -> dict:
    ctx: dict[str, Any] = {"allowPrivilegeEscalation": False}
    if non_root:
        ctx["capabilities"] = {"drop": ["ALL"]}
    return ctx


def _pod_security(non_root: bool) -> dict:
    ctx: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if non_root:
        ctx.update({"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER})
    return ctx


def _model_volume(svc: LLMService) -> dict:
    source = svc.spec.model.source
    if source.pvc is not None:
        return {"name": "model", "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
    if source.host_path is not None:
        return {"name": "model", "hostPath": {"path": source.host_path.path, "type": "Directory"}}
    return model_cache.volume(svc)  # uri: the node cache, a PVC cache or an emptyDir


def _fetch_model_container(svc: LLMService, opts: ImageOptions) -> dict:
    """initContainer that downloads `source.uri` (into the model cache, else the emptyDir: `model_cache`)."""
    return model_cache.fetch_container(svc, router_image(svc, opts), MODEL_MOUNT, _container_security(non_root=True))


def _worker_pod_annotations(svc: LLMService) -> dict:
    """The KV-secret rotation asked for: a new value rolls the workers onto the new token (they read
    BATON_KV_SECRET at start)."""
    rotation = (svc.metadata.annotations or {}).get(ANNOTATION_ROTATE_KV_SECRET)
    return {ANNOTATION_ROTATE_KV_SECRET: rotation} if rotation else {}


def _vllm_pre_stop() -> dict:
    """vLLM stops serving as soon as it gets SIGTERM; the preStop sleep keeps it serving while the endpoint
    removal reaches the routers. A Baton worker needs none: on SIGTERM it answers /ready 503 at once and still
    serves, KV pulls included, until every lease it holds is pulled or expired (launch.DRAIN_ACCEPT_SECONDS,
    with_drain)."""
    return {"preStop": {"exec": {"command": ["sleep", f"{launch.DRAIN_ACCEPT_SECONDS:g}"]}}}


def _worker_labels(svc: LLMService, role: str) -> dict[str, str]:
    """A worker Deployment's and its pods' labels: the role's, and the engine (the PodMonitor picks the port it
    scrapes by it: `launch.scrape_port_name`)."""
    return {**role_labels(svc.name, role), LABEL_ENGINE: svc.spec.engine.kind}


def _worker_deployment(svc: LLMService, role: str, opts: ImageOptions) -> dict:
    r = _role(svc, role)
    vllm = svc.spec.engine.kind == "vllm"
    command, args = worker_command(svc, role)
    grace = launch.termination_grace_seconds(worker_launch(svc, role))
    paths = launch.probes(svc.spec.engine.kind)
    kv_port = svc.spec.kv_transfer.port
    mounts = [model_cache.worker_mount(svc, MODEL_MOUNT)]
    volumes = [_model_volume(svc)]
    if r.tensor_parallel > 1 or vllm:
        # NCCL between the TP ranks needs far more shared memory than the runtime's 64 MiB default, and so does
        # vLLM at any TP: its engine core's broadcast queue (shm_broadcast.MessageQueue) refuses to start with
        # "Insufficient space in /dev/shm: 160 MiB required, 64 MiB free" (vLLM 0.32, seen on our real nodes).
        # A memory-backed emptyDir counts against the pod's memory limit.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    container = {
        "name": "worker",
        "image": _engine_image(svc, opts),
        "command": command,
        "args": args,
        "ports": [
            {"name": launch.HTTP_PORT_NAME, "containerPort": r.port, "protocol": "TCP"},
            {"name": "kv", "containerPort": kv_port, "protocol": "TCP"},
            # a Baton worker's /metrics for Prometheus (vLLM serves them on its HTTP port alone)
            *([] if vllm else [{"name": launch.METRICS_PORT_NAME, "containerPort": launch.DEFAULT_METRICS_PORT,
                                "protocol": "TCP"}]),
        ],
        "env": _worker_env(svc, role),
        "resources": _worker_resources(svc, r),
        "volumeMounts": mounts,
        "startupProbe": _probe(paths.startup, STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _readiness_probe(paths.readiness),
        "livenessProbe": _probe(paths.liveness, 10, 3),
        "securityContext": _container_security(non_root=not vllm),
    }
    if vllm:
        container["lifecycle"] = _vllm_pre_stop()
    container = render_vllm.with_rdma(svc, container)  # vLLM with kvTransfer rdma/auto: UCX env, device, IPC_LOCK
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(svc.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": _pod_security(non_root=not vllm),
    }
    _pull_secrets(svc, opts, pod_spec)
    if svc.spec.model.source.uri is not None:
        pod_spec["initContainers"] = [_fetch_model_container(svc, opts)]
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = volumes
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(r.node_selector.items()))
    if r.tolerations:
        # Only the fields the user wrote: passed through as given (Kubernetes fills its own defaults).
        pod_spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
                                   for t in r.tolerations]
    affinity = merge_affinity(r.affinity, locality_affinity(svc, role))
    if affinity:
        pod_spec["affinity"] = affinity

    spec: dict[str, Any] = {}
    if svc.spec.autoscaling_mode(role) == AUTOSCALING_OFF:  # else Baton's or an outside autoscaler owns replicas
        spec["replicas"] = r.replicas
    spec.update({
        "selector": {"matchLabels": selector_labels(svc.name, role)},
        "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
        "progressDeadlineSeconds": WORKER_PROGRESS_DEADLINE,
        "minReadySeconds": WORKER_MIN_READY_SECONDS,
        "strategy": copy.deepcopy(ROLLING_UPDATE),
        "template": {
            "metadata": {
                "labels": _worker_labels(svc, role),
                **({"annotations": annotations} if (annotations := _worker_pod_annotations(svc)) else {}),
            },
            "spec": pod_spec,
        },
    })
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(svc, role_name(svc.name, role), _worker_labels(svc, role)),
        "spec": spec,
    }


# ---------------------------------------------------------------------------------------------- router
def decode_only(svc: LLMService) -> bool:
    """The service runs no prefill pods by design: prefill replicas 0 that nobody scales (autoscaling mode
    off) -- a colocated layout, written by the user or laid over the spec by an applied plan."""
    return svc.spec.prefill.replicas == 0 and svc.spec.autoscaling_mode(ROLE_PREFILL) == AUTOSCALING_OFF


def router_command(svc: LLMService) -> tuple[list[str], list[str]]:
    """(command, args) of the router container: workers discovered from the role Services; health checks on
    the engine's readiness path; the prefill-failure policy and the TPOT SLO its `whenHeadroom` protects. A
    decode-only service (`decode_only`) gets no prefill Service: its router has the decode workers compute the
    prompts by design, where an empty prefill Service would mean "prefill is down" (the prefill-failure policy:
    recompute only while decode has TPOT headroom, else 503)."""
    failure = svc.spec.router.prefill_failure
    return launch.split_command(launch.router_argv(launch.RouterLaunch(
        engine=svc.spec.engine.kind,
        policy=svc.spec.router.policy,
        port=svc.spec.router.port,
        host=launch.POD_LISTEN_HOST,
        prefill_service=None if decode_only(svc) else role_name(svc.name, ROLE_PREFILL),
        decode_service=role_name(svc.name, ROLE_DECODE),
        namespace=svc.namespace,
        prefill_retries=failure.retries,
        prefill_recompute=failure.recompute,
        prefill_retry_after=int(failure.retry_after.seconds),
        tpot_slo=svc.spec.slo.tpot.seconds,
        otlp_traces_endpoint=tracing.otlp_endpoint(svc),
        metrics_port=launch.DEFAULT_METRICS_PORT,
        drain_timeout=launch.ROUTER_DRAIN_SECONDS,
    )))


def _router_deployment(svc: LLMService, opts: ImageOptions) -> dict:
    command, args = router_command(svc)
    router = svc.spec.router
    container = {
        "name": "router",
        "image": router_image(svc, opts),
        "command": command,
        "args": args,
        # /metrics on a port of its own: the client-facing Service (port http) hands out no metrics
        "ports": [{"name": "http", "containerPort": router.port, "protocol": "TCP"},
                  {"name": launch.METRICS_PORT_NAME, "containerPort": launch.DEFAULT_METRICS_PORT,
                   "protocol": "TCP"}],
        "env": _common_env(svc, ROLE_ROUTER),
        "resources": _router_resources(svc),
        "startupProbe": _probe(launch.ROUTER_PROBES.startup, ROUTER_STARTUP_PERIOD_SECONDS,
                               ROUTER_STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _probe(launch.ROUTER_PROBES.readiness, 5, 3),
        "livenessProbe": _probe(launch.ROUTER_PROBES.liveness, 10, 3),
        "securityContext": _container_security(non_root=True),
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(svc.name),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": launch.router_termination_grace_seconds(),
        "securityContext": _pod_security(non_root=True),
        "containers": [container],
    }
    _pull_secrets(svc, opts, pod_spec)
    if router.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(router.node_selector.items()))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(svc, router_deployment_name(svc.name), role_labels(svc.name, ROLE_ROUTER)),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": selector_labels(svc.name, ROLE_ROUTER)},
            "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
            "progressDeadlineSeconds": ROUTER_PROGRESS_DEADLINE,
            "strategy": copy.deepcopy(ROLLING_UPDATE),
            "template": {
                "metadata": {"labels": role_labels(svc.name, ROLE_ROUTER)},
                "spec": pod_spec,
            },
        },
    }


# ------------------------------------------------------------------------------------------------- API
def render_parsed(svc: LLMService, opts: ImageOptions | None = None,
                  network: render_network.NetworkPolicyOptions | None = None) -> list[dict]:
    """`render` for an already parsed LLMService."""
    opts = opts or images.OPTIONS
    return [
        _service_account(svc),
        _router_role(svc),
        _router_role_binding(svc),
        _headless_service(svc, ROLE_PREFILL),
        _headless_service(svc, ROLE_DECODE),
        _router_service(svc),
        *render_network.network_policies(svc, _metadata, network),
        _worker_deployment(svc, ROLE_PREFILL, opts),
        _worker_deployment(svc, ROLE_DECODE, opts),
        _router_deployment(svc, opts),
    ]


def render(llmservice: dict, opts: ImageOptions | None = None,
           network: render_network.NetworkPolicyOptions | None = None) -> list[dict]:
    """The child manifests of `llmservice` (the full object as the apiserver returns it), in a fixed order.

    Raises `InvalidLLMService` (a ValueError whose `problems` are `field.path: message` lines) when the
    object does not validate. Objects carry an ownerReference to the LLMService when `metadata.uid` is set
    (always, for objects from the apiserver; a local preview without uid gets none). The input is not
    modified, and no two returned manifests share mutable parts. With `spec.planner.mode: apply`, the applied
    `status.plan` is laid over the spec first (`planner.overlay.effective`). Images and pull secrets the spec
    leaves open come from `opts`, default the operator's configuration (`images.OPTIONS`); the NetworkPolicies'
    defaults from `network` (`render_network.OPTIONS`).
    """
    return render_parsed(parse_llmservice(effective(llmservice)), opts, network)


def child_keys(llmservice: dict) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child `render` returns, in the same order.

    Depends only on `metadata.name`, so it works even for a spec that no longer validates (to find and prune
    or report on existing children); the NetworkPolicies are listed even where they are switched off.
    """
    name = (llmservice.get("metadata") or {}).get("name")
    if not name:
        raise InvalidLLMService(["metadata.name: is required"])
    return [(api_version, kind, namer(name)) for api_version, kind, namer in CHILDREN]


__all__ = [
    "CHILDREN",
    "WORKER_ROLES",
    "child_keys",
    "locality_affinity",
    "merge_affinity",
    "owner_reference",
    "render",
    "render_parsed",
    "router_command",
    "stable_hash",
    "worker_command",
]
