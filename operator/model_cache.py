"""How a `uri` model source reaches the worker pods (`spec.model.cache`): the node model cache. Pure.

    cache: {}                 (mode node, the default) the node's cache folder, a hostPath (DirectoryOrCreate) at
                              the operator's --model-cache-path (env BATON_MODEL_CACHE_PATH, Helm value
                              modelCache.hostPath; default /var/lib/baton/model-cache): fetched once per node
    cache: {pvc: NAME}        that PersistentVolumeClaim holds the cache instead (ReadWriteMany: once per cluster)
    cache: {mode: none}       every pod downloads into its own emptyDir (before issue 19)

With a cache, the `fetch-model` init container mounts the volume read-write at `launch.MODEL_CACHE_MOUNT` and runs
`baton model fetch --cache-dir` (worker/model_cache.py: an flock per entry, temp folder + rename, a marker), which
fills the entry `launch.model_cache_key(uri)`; the worker container mounts only that entry (subPath), read-only,
at /models, where its --model points -- the worker's command line is the same in every mode. The fetch runs as
uid 0 with every capability dropped and no privilege escalation: the kubelet creates the hostPath folder owned
by root (0755) and a Baton pod's uid 1000 could not write it; the entries it writes are world-readable and the
workers (uid 1000) only read them. With the node cache the fetch container requests `size` (default 1Gi) of
ephemeral-storage, so the scheduler counts the download against the node's disk.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from baton import launch

from .api import LLMService

ENV_CACHE_PATH = "BATON_MODEL_CACHE_PATH"
DEFAULT_HOST_PATH = "/var/lib/baton/model-cache"
DEFAULT_FETCH_STORAGE = "1Gi"
MODE_EMPTY_DIR, MODE_NODE, MODE_PVC = "emptyDir", "node", "pvc"
#: the fetch container's securityContext with a cache: root (it writes the root-owned cache), nothing more
FETCH_AS_ROOT = {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                 "capabilities": {"drop": ["ALL"]}}


@dataclasses.dataclass(frozen=True)
class Options:
    """The operator's cache setting (set once at start by `baton operator run --model-cache-path`)."""

    host_path: str = dataclasses.field(default_factory=lambda: os.environ.get(ENV_CACHE_PATH) or DEFAULT_HOST_PATH)


OPTIONS = Options()


def configure(host_path: str | None) -> None:
    global OPTIONS
    if host_path is not None and not host_path.startswith("/"):
        raise ValueError(f"--model-cache-path must be an absolute path, got {host_path!r}")
    OPTIONS = Options(host_path=host_path) if host_path else Options()


def mode(svc: LLMService) -> str:
    """emptyDir, node or pvc, for a `uri` source."""
    cache = svc.spec.model.cache
    if cache.mode == "none":
        return MODE_EMPTY_DIR
    return MODE_PVC if cache.pvc is not None else MODE_NODE


def volume(svc: LLMService, options: Options | None = None) -> dict:
    """The pod's `model` volume for a `uri` source."""
    m = mode(svc)
    if m == MODE_PVC:
        return {"name": "model", "persistentVolumeClaim": {"claimName": svc.spec.model.cache.pvc}}
    if m == MODE_NODE:
        path = (options or OPTIONS).host_path
        return {"name": "model", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}
    return {"name": "model", "emptyDir": {}}


def entry(svc: LLMService) -> str | None:
    """The cache entry the worker mounts (subPath of the `model` volume); None without a cache."""
    if mode(svc) == MODE_EMPTY_DIR:
        return None
    return launch.model_cache_key(str(svc.spec.model.source.uri))


def worker_mount(svc: LLMService, mount_path: str) -> dict:
    """The worker container's read-only mount of the model (the cache entry, when there is a cache)."""
    mount: dict[str, Any] = {"name": "model", "mountPath": mount_path, "readOnly": True}
    key = entry(svc) if svc.spec.model.source.uri is not None else None
    if key is not None:
        mount["subPath"] = key
    return mount


def fetch_container(svc: LLMService, image: str, model_mount: str, security: dict) -> dict:
    """The `fetch-model` init container: into the cache (mounted rw, as root) or into the pod's emptyDir at
    `model_mount` (as the pod's user, `security` its securityContext); credentials from `source.secretRef`."""
    source = svc.spec.model.source
    m = mode(svc)
    cached = m != MODE_EMPTY_DIR
    argv = launch.model_fetch_argv(str(source.uri), **(
        {"cache_dir": launch.MODEL_CACHE_MOUNT} if cached else {"dest": model_mount}))
    n = len(launch.BATON_COMMAND) + len(launch.FETCH_SUBCOMMAND)
    container: dict[str, Any] = {"name": "fetch-model", "image": image, "command": argv[:n], "args": argv[n:]}
    if source.secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": source.secret_ref.name}}]
    if m == MODE_NODE:
        size = svc.spec.model.cache.size
        container["resources"] = {"requests": {"ephemeral-storage": str(size) if size else DEFAULT_FETCH_STORAGE}}
    container["volumeMounts"] = [{"name": "model", "mountPath": launch.MODEL_CACHE_MOUNT if cached else model_mount}]
    container["securityContext"] = copy.deepcopy(FETCH_AS_ROOT) if cached else security
    return container
