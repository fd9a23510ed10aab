"""What a vLLM worker pod needs for RDMA KV transfer (NIXL over UCX), laid over the pod `render` builds.

With `kvTransfer.transport: rdma` (or `auto`) on the vLLM engine, NIXL moves the KV cache through UCX, which
needs, on a real RDMA cluster (the same things llm-d's and NVIDIA Dynamo's vLLM P/D manifests give their
workers; see docs/vllm.md):

* the RDMA device: an extended resource of the cluster's RDMA device plugin (`kvTransfer.rdma.resource`, default
  `rdma/ib`, `count` per pod), in requests and limits alike -- only with `rdma`: `auto` must also schedule on
  nodes without the device plugin, so it requests none;
* the `IPC_LOCK` capability: UCX pins (mlocks) the registered KV buffers, beyond the default memlock limit;
* `UCX_TLS`: the RDMA transports (rc/dc, accelerated first), `cuda_copy`/`cuda_ipc` so UCX recognizes GPU
  buffers on `accelerator: gpu`, and `tcp` only with `auto` (its fallback); `UCX_NET_DEVICES` from
  `kvTransfer.rdma.netDevices`;
* a memory-backed /dev/shm (NCCL between TP ranks; vLLM wants 160 MiB of it even at TP 1), which `render` gives
  every vLLM worker.

A variable the user already sets in `engine.env` is left to them (an env list must not name one twice).
"""
from __future__ import annotations

from typing import Any

from .api import ACCELERATOR_GPU, LLMService

UCX_TLS = "UCX_TLS"
UCX_NET_DEVICES = "UCX_NET_DEVICES"
RDMA_TLS = ("rc_x", "rc", "dc_x", "dc")
GPU_TLS = ("cuda_copy", "cuda_ipc")
IPC_LOCK = "IPC_LOCK"


def uses_rdma(svc: LLMService) -> bool:
    """vLLM workers that may move KV over RDMA (transport rdma, or auto)."""
    return svc.spec.engine.kind == "vllm" and svc.spec.kv_transfer.transport in ("rdma", "auto")


def requests_rdma_device(svc: LLMService) -> bool:
    return svc.spec.engine.kind == "vllm" and svc.spec.kv_transfer.transport == "rdma"


def ucx_tls(svc: LLMService) -> str:
    tls = list(RDMA_TLS)
    if svc.spec.effective_accelerator() == ACCELERATOR_GPU:
        tls += GPU_TLS
    if svc.spec.kv_transfer.transport == "auto":
        tls.append("tcp")
    return ",".join(tls)


def rdma_env(svc: LLMService) -> list[dict[str, str]]:
    """UCX_TLS and UCX_NET_DEVICES of a worker, leaving out what engine.env sets itself."""
    if not uses_rdma(svc):
        return []
    own = {var.name for var in svc.spec.engine.env}
    env = [{"name": UCX_TLS, "value": ucx_tls(svc)},
           {"name": UCX_NET_DEVICES, "value": svc.spec.kv_transfer.rdma.net_devices}]
    return [e for e in env if e["name"] not in own]


def with_rdma(svc: LLMService, container: dict[str, Any]) -> dict[str, Any]:
    """`container` (a vLLM worker) with the RDMA env, device request and IPC_LOCK; unchanged otherwise."""
    if not uses_rdma(svc):
        return container
    out = dict(container)
    out["env"] = [*container["env"], *rdma_env(svc)]
    security = dict(container.get("securityContext") or {})
    caps = dict(security.get("capabilities") or {})
    caps["add"] = sorted({*caps.get("add", []), IPC_LOCK})
    security["capabilities"] = caps
    out["securityContext"] = security
    if requests_rdma_device(svc):
        rdma = svc.spec.kv_transfer.rdma
        resources = {k: dict(v) for k, v in container["resources"].items()}
        # a count the user put in the role's resources wins; extended resources need requests == limits
        count = resources.get("limits", {}).get(rdma.resource) or str(rdma.count)
        for section in ("limits", "requests"):
            values = resources.setdefault(section, {})
            values[rdma.resource] = count
            resources[section] = dict(sorted(values.items()))
        out["resources"] = resources
    return out
