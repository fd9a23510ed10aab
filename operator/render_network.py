"""The NetworkPolicies of an LLMService: who may open a connection to which of its pods, on which port.

Pure, like `render` (which calls it): the parsed LLMService and the operator's options in, manifests out.
One NetworkPolicy per role (`<name>-prefill`, `<name>-decode`, `<name>-router`; Ingress only, egress stays
open), each selecting that role's pods by their stable selector labels (instance + role):

    prefill, decode pods   HTTP port (the role's `port`)   from this LLMService's router pods
                           metrics port (9400; vLLM: the   from the metrics peers (Prometheus)
                           HTTP port)
                           KV ports                        from this LLMService's other worker role
    router pods            router port                     from anyone (spec.networkPolicy.routerFrom to narrow
                                                           it)
                           metrics port (9400)             from the metrics peers

One policy per role rather than one per LLMService: a policy's rules apply to every pod it selects, so a
single policy would let "router port from anyone" open the same port number on a worker.

Decisions worth knowing:

* The router and Baton workers serve `/metrics` for Prometheus on a port of their own
  (`launch.DEFAULT_METRICS_PORT`, container port `metrics`): the router's, not behind its client-facing
  Service, since they name the worker pods' addresses; a Baton worker's so that the metrics peers get no way
  into its API (its HTTP port keeps `/metrics` for the router, which reads the worker's queue there). vLLM has
  no metrics listener of its own: for vLLM workers the metrics peers are let into the HTTP port, API included.
* KV ports: the Baton TCP transport's `kvTransfer.port`, which is also vLLM's NIXL side channel
  (VLLM_NIXL_SIDE_CHANNEL_PORT), in both directions between prefill and decode (vLLM's NIXL push mode connects
  prefill -> decode). NIXL moves the data itself through UCX; UCX's TCP transport listens on a port per UCX
  worker, network interface and TP rank, chosen by the kernel unless `UCX_TCP_PORT_RANGE` pins it. When
  `spec.engine.env` sets `UCX_TCP_PORT_RANGE` to a literal `N` or `N-M`, those ports are opened (one entry each:
  NetworkPolicy's `endPort` needs Kubernetes 1.22, and the local control plane is 1.20). Otherwise vLLM
  workers (always NIXL) get every port between the two roles -- still only this LLMService's prefill and
  decode pods. Baton workers get the KV port only: the stock worker image has no NIXL, so `auto` is TCP there
  (a Baton image with NIXL must pin UCX_TCP_PORT_RANGE). The operator does not pin a range itself: UCX's
  bind loop retries forever once every port of the range is taken, the number of listeners depends on
  vLLM's NIXL threads and the TP size, and a range outside the node's ip_local_port_range disables UCX's TCP
  transport. RDMA (rc/dc verbs) bypasses the kernel's IP stack: no NetworkPolicy sees it either way.
* Labels are the pods' identity: any pod in the namespace carrying a router's selector labels is let in as
  one. Kubelet probes come from the node, which NetworkPolicy always allows.
* `enabled`: `spec.networkPolicy.enabled`, else the operator's `--no-network-policy` (Helm value
  `networkPolicy.enabled`, default on). Switched off, the reconciler prunes the policies. A CNI plugin that
  does not implement NetworkPolicy (the local clusters' bridge plugin) ignores them.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError

from baton import launch

from .api import LLMService
from .api_network import NetworkPeer
from .labels import ROLE_DECODE, ROLE_PREFILL, ROLE_ROUTER, role_labels, selector_labels
from .naming import role_name, router_deployment_name

NETWORK_API = "networking.k8s.io/v1"
UCX_TCP_PORT_RANGE = "UCX_TCP_PORT_RANGE"
#: Beyond this many UCX ports, the KV rule opens every port between the two worker roles instead.
MAX_LISTED_PORTS = 256
#: The Prometheus Operator labels its Prometheus pods app.kubernetes.io/name=prometheus.
DEFAULT_METRICS_FROM: tuple[dict, ...] = (
    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},)

_PEERS = TypeAdapter(list[NetworkPeer])
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclasses.dataclass(frozen=True)
class NetworkPolicyOptions:
    """The operator's defaults (set once at start by `baton operator run`)."""

    enabled: bool = True
    metrics_from: tuple[dict, ...] = DEFAULT_METRICS_FROM  # NetworkPolicyPeer manifests


#: Set by `baton operator run`; `render` reads it when given no options.
OPTIONS = NetworkPolicyOptions()


def parse_peers(text: str) -> tuple[dict, ...]:
    """A JSON list of NetworkPolicyPeers (the `--network-policy-metrics-from` flag), validated like the spec's."""
    try:
        peers = _PEERS.validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"not a JSON list of NetworkPolicy peers ({{namespaceSelector, podSelector}}): "
                         f"{exc.errors()[0]['msg']}") from None
    return tuple(p.manifest() for p in peers)


def configure(enabled: bool = True, metrics_from: str | None = None) -> None:
    """Replace OPTIONS with the command line's values. Raises ValueError for a bad `metrics_from`."""
    global OPTIONS
    OPTIONS = NetworkPolicyOptions(
        enabled=enabled,
        metrics_from=parse_peers(metrics_from) if metrics_from is not None else DEFAULT_METRICS_FROM)


def policies_enabled(svc: LLMService, opts: NetworkPolicyOptions) -> bool:
    spec = svc.spec.network_policy
    return opts.enabled if spec.enabled is None else spec.enabled


def metrics_peers(svc: LLMService, opts: NetworkPolicyOptions) -> list[dict]:
    own = svc.spec.network_policy.metrics_from
    if own is None:
        return [json.loads(json.dumps(p)) for p in opts.metrics_from]  # copies: manifests share nothing
    return [p.manifest() for p in own]


def ucx_port_range(svc: LLMService) -> tuple[int, int] | None | bool:
    """`UCX_TCP_PORT_RANGE` from spec.engine.env: (first, last); None when not set; False when set to
    something that names no fixed ports (valueFrom, `0` = the kernel's choice, not `N` / `N-M`)."""
    var = next((v for v in svc.spec.engine.env if v.name == UCX_TCP_PORT_RANGE), None)
    if var is None:
        return None
    match = _RANGE.match(var.value or "") if var.value_from is None else None
    if not match:
        return False
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    if first == 0 or not first <= last <= 65535:
        return False
    return first, last


def kv_ports(svc: LLMService) -> list[int] | None:
    """The ports one worker role opens to the other; None: every port (module docstring)."""
    kv = svc.spec.kv_transfer.port
    ucx = ucx_port_range(svc)
    if ucx is None:
        return None if svc.spec.engine.kind == "vllm" else [kv]
    if ucx is False or ucx[1] - ucx[0] + 1 > MAX_LISTED_PORTS:
        return None
    return [kv] + [p for p in range(ucx[0], ucx[1] + 1) if p != kv]


def _tcp(ports: list[int]) -> list[dict]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _pods(svc: LLMService, role: str) -> dict:
    return {"podSelector": {"matchLabels": selector_labels(svc.name, role)}}


def _worker_ingress(svc: LLMService, role: str, opts: NetworkPolicyOptions) -> list[dict]:
    port = (svc.spec.prefill if role == ROLE_PREFILL else svc.spec.decode).port
    other = ROLE_DECODE if role == ROLE_PREFILL else ROLE_PREFILL
    rules = [{"from": [_pods(svc, ROLE_ROUTER)], "ports": _tcp([port])}]
    if peers := metrics_peers(svc, opts):
        # vLLM serves /metrics on its API port alone; a Baton worker on a port of its own (module docstring)
        scraped = port if svc.spec.engine.kind == launch.ENGINE_VLLM else launch.DEFAULT_METRICS_PORT
        rules.append({"from": peers, "ports": _tcp([scraped])})
    kv_rule: dict = {"from": [_pods(svc, other)]}
    if (ports := kv_ports(svc)) is not None:
        kv_rule["ports"] = _tcp(ports)
    rules.append(kv_rule)
    return rules


def _router_ingress(svc: LLMService, opts: NetworkPolicyOptions) -> list[dict]:
    port = svc.spec.router.port
    own = svc.spec.network_policy.router_from
    if own is None:
        rules = [{"ports": _tcp([port])}]  # no `from`: every source
    else:
        rules = [{"from": [p.manifest() for p in own], "ports": _tcp([port])}] if own else []
    if peers := metrics_peers(svc, opts):
        rules.append({"from": peers, "ports": _tcp([launch.DEFAULT_METRICS_PORT])})
    return rules


def network_policies(svc: LLMService, metadata: Callable[[LLMService, str, dict], dict],
                     opts: NetworkPolicyOptions | None = None) -> list[dict]:
    """The NetworkPolicies of `svc` (prefill, decode, router), or none when switched off. `metadata(svc, name,
    labels)` is render's (namespace, owner reference)."""
    opts = opts or OPTIONS
    if not policies_enabled(svc, opts):
        return []
    out = []
    for role, name, ingress in (
            (ROLE_PREFILL, role_name(svc.name, ROLE_PREFILL), _worker_ingress(svc, ROLE_PREFILL, opts)),
            (ROLE_DECODE, role_name(svc.name, ROLE_DECODE), _worker_ingress(svc, ROLE_DECODE, opts)),
            (ROLE_ROUTER, router_deployment_name(svc.name), _router_ingress(svc, opts))):
        out.append({
            "apiVersion": NETWORK_API,
            "kind": "NetworkPolicy",
            "metadata": metadata(svc, name, role_labels(svc.name, role)),
            "spec": {
                "podSelector": {"matchLabels": selector_labels(svc.name, role)},
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        })
    return out
