"""The per-role NetworkPolicies (`render_network.py`), judged by what they let through.

Our local clusters' CNI (the bridge plugin) does not enforce NetworkPolicy, so these tests evaluate the rendered
policies with a small pure model of Kubernetes' semantics (`allowed`), on pods labelled exactly as the rendered
Deployments label theirs:

* a pod's ingress is restricted only when some policy in its namespace selects it (podSelector) with policy
  type Ingress; then a connection is allowed when any rule of any such policy admits it (policies add up);
* a rule admits a source when its `from` is missing/empty or a peer matches, and a port when its `ports` is
  missing/empty or an entry matches (protocol, port number or named container port, endPort);
* a peer with only podSelector means pods of the policy's namespace; with namespaceSelector, pods of the
  matching namespaces (podSelector, if also set, ANDed);
* egress is judged the same way from the source's side (our policies declare none).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
from baton.operator import render_network
from baton.operator.api import InvalidLLMService, parse_llmservice
from baton.operator.render import render
from baton.operator.render_network import NetworkPolicyOptions


# ------------------------------------------------------------------------------------------ the evaluator
@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # named container ports, for named policy ports


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and every matchExpression must hold; `{}` matches everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, policy_namespace: str, pod: Pod, namespaces: dict[str, dict[str, str]]) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("no ipBlock peers are rendered")
    if "namespaceSelector" in peer:
        in_namespace = selector_matches(peer["namespaceSelector"], namespaces[pod.namespace])
    else:
        in_namespace = pod.namespace == policy_namespace
    return in_namespace and ("podSelector" not in peer or selector_matches(peer["podSelector"], pod.labels))


def port_matches(entry: dict, target: Pod, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    want = entry.get("port")
    if want is None:
        return True  # every port of the protocol
    if isinstance(want, str):
        want = target.ports.get(want)
        if want is None:
            return False
    return want <= port <= entry.get("endPort", want) if "endPort" in entry else port == want


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def selecting(policies: list[dict], pod: Pod, kind: str) -> list[dict]:
    return [p for p in policies if p["metadata"]["namespace"] == pod.namespace
            and selector_matches(p["spec"]["podSelector"], pod.labels) and kind in policy_types(p)]


def _admits(policies: list[dict], pod: Pod, peer: Pod, port_pod: Pod, port: int, protocol: str,
            kind: str, namespaces: dict) -> bool:
    rules_key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    chosen = selecting(policies, pod, kind)
    if not chosen:
        return True  # selected by no policy of this type: unrestricted
    for policy in chosen:
        for rule in policy["spec"].get(rules_key) or []:
            peers, ports = rule.get(peers_key), rule.get("ports")
            if peers and not any(peer_matches(p, policy["metadata"]["namespace"], peer, namespaces)
                                 for p in peers):
                continue
            if ports and not any(port_matches(e, port_pod, port, protocol) for e in ports):
                continue
            return True
    return False


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int, namespaces: dict[str, dict[str, str]],
            protocol: str = "TCP") -> bool:
    """Whether `src` may open a connection to `dst`:`port`."""
    return (_admits(policies, src, dst, dst, port, protocol, "Egress", namespaces)
            and _admits(policies, dst, src, dst, port, protocol, "Ingress", namespaces))


# -------------------------------------------------------------------------------- the evaluator's own tests
def _np(ns: str, selector: dict, ingress: list | None = None, types: list | None = None, egress=None) -> dict:
    spec: dict = {"podSelector": selector}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"metadata": {"name": "p", "namespace": ns}, "spec": spec}


NS = {"a": {"team": "a"}, "b": {"team": "b"}}
WEB = Pod("web", "a", {"app": "web"}, {"http": 80})
CLI = Pod("cli", "a", {"app": "cli"})
CLI_B = Pod("cli-b", "b", {"app": "cli"})


def test_evaluator_follows_kubernetes_semantics():
    # no policy selects the pod: everything goes
    assert allowed([_np("a", {"matchLabels": {"app": "other"}}, [])], CLI, WEB, 80, NS)
    # selected with no rule: nothing goes; a policy in another namespace does not select it
    assert not allowed([_np("a", {}, [])], CLI, WEB, 80, NS)
    assert allowed([_np("b", {}, [])], CLI, WEB, 80, NS)
    # a rule without `from` admits every source, without `ports` every port
    assert allowed([_np("a", {}, [{"ports": [{"port": 80}]}])], CLI_B, WEB, 80, NS)
    assert not allowed([_np("a", {}, [{"ports": [{"port": 80}]}])], CLI_B, WEB, 81, NS)
    assert allowed([_np("a", {}, [{"from": [{"podSelector": {}}]}])], CLI, WEB, 12345, NS)
    # podSelector alone: same namespace only; namespaceSelector + podSelector in one peer: AND
    same_ns = [_np("a", {}, [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}])]
    assert allowed(same_ns, CLI, WEB, 80, NS) and not allowed(same_ns, CLI_B, WEB, 80, NS)
    both = [_np("a", {}, [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}},
                                     "podSelector": {"matchLabels": {"app": "web"}}}]}])]
    assert not allowed(both, CLI_B, WEB, 80, NS)
    either = [_np("a", {}, [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
                                      {"podSelector": {"matchLabels": {"app": "web"}}}]}])]
    assert allowed(either, CLI_B, WEB, 80, NS) and not allowed(either, CLI, WEB, 80, NS)
    # policies add up; named ports and endPort; protocol
    two = [_np("a", {}, [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": "http"}]}]),
           _np("a", {}, [{"ports": [{"port": 9000, "endPort": 9010}]}])]
    assert allowed(two, CLI, WEB, 80, NS) and allowed(two, CLI_B, WEB, 9005, NS)
    assert not allowed(two, CLI_B, WEB, 80, NS) and not allowed(two, CLI, WEB, 9011, NS)
    assert not allowed(two, CLI, WEB, 80, NS, protocol="UDP")
    # matchExpressions
    expr = [_np("a", {}, [{"from": [{"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["cli"]}]}}]}])]
    assert allowed(expr, CLI, WEB, 80, NS) and not allowed(expr, WEB, WEB, 80, NS)
    # egress of the source counts too
    deny_out = [_np("a", {"matchLabels": {"app": "cli"}}, types=["Egress"], egress=[])]
    assert not allowed(deny_out, CLI, WEB, 80, NS) and allowed(deny_out, WEB, CLI, 80, NS)


# ---------------------------------------------------------------------------------------- the world
NAMESPACES = {"team": {"kubernetes.io/metadata.name": "team"},
              "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
              "elsewhere": {"kubernetes.io/metadata.name": "elsewhere"}}
PROMETHEUS = Pod("prometheus-0", "monitoring", {"app.kubernetes.io/name": "prometheus"})
PROMETHEUS_LOOKALIKE = Pod("fake-prom", "team", {"app.kubernetes.io/name": "prometheus"})
CLIENT = Pod("client", "team", {"app": "client"})
OUTSIDER = Pod("outsider", "elsewhere", {"app": "client"})
GATEWAY = Pod("gateway", "team", {"app": "gateway"})


def llmservice(name: str = "svc", **spec) -> dict:
    body = {
        "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 1},
        "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}}, "engine": {"kind": "baton"}},
    }
    body["spec"].update(copy.deepcopy(spec))
    return body


def vllm(name: str = "svc", env: list | None = None, **spec) -> dict:
    return llmservice(name, engine={"kind": "vllm", "image": "vllm/vllm-openai:v0.32.0", "env": env or []}, **spec)


def pods(manifests: list[dict]) -> dict[str, Pod]:
    """One pod per rendered Deployment, labelled as its template says, with its named container ports."""
    out = {}
    for d in manifests:
        if d["kind"] == "Deployment":
            tpl = d["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for p in tpl["spec"]["containers"][0]["ports"]}
            role = tpl["metadata"]["labels"]["baton.dev/role"]
            out[role] = Pod(f"{d['metadata']['name']}-0", d["metadata"]["namespace"], tpl["metadata"]["labels"], ports)
    return out


def policies(manifests: list[dict]) -> list[dict]:
    return [m for m in manifests if m["kind"] == "NetworkPolicy"]


ON = NetworkPolicyOptions()
HTTP, ROUTER_PORT, KV = 8000, 8080, 14579
METRICS = 9400  # a router's and a Baton worker's own /metrics port (launch.DEFAULT_METRICS_PORT)


@pytest.fixture
def baton_world():
    mine, other = render(llmservice(), network=ON), render(llmservice("other"), network=ON)
    return policies(mine) + policies(other), pods(mine), pods(other)


def test_renders_one_ingress_policy_per_role_before_the_deployments():
    manifests = render(llmservice(), network=ON)
    kinds = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    nps = [k for k in kinds if k[0] == "NetworkPolicy"]
    assert nps == [("NetworkPolicy", "svc-prefill"), ("NetworkPolicy", "svc-decode"), ("NetworkPolicy", "svc-router")]
    assert kinds.index(nps[-1]) < kinds.index(("Deployment", "svc-prefill"))  # pods start behind them
    for np in policies(manifests):
        assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"]
        assert np["metadata"]["ownerReferences"][0]["uid"] == "uid-svc"
        assert np["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "baton-operator"  # listed, pruned


def test_baton_service_pairs(baton_world):
    nps, mine, other = baton_world
    router, prefill, decode = mine["router"], mine["prefill"], mine["decode"]
    ok = lambda src, dst, port: allowed(nps, src, dst, port, NAMESPACES)
    # HTTP: workers only from their own router
    assert ok(router, prefill, HTTP) and ok(router, decode, HTTP)
    assert not ok(CLIENT, prefill, HTTP) and not ok(CLIENT, decode, HTTP)
    assert not ok(other["router"], prefill, HTTP) and not ok(OUTSIDER, decode, HTTP)
    assert not ok(prefill, decode, HTTP) and not ok(decode, prefill, HTTP)
    # KV: only between this service's prefill and decode, both ways
    assert ok(decode, prefill, KV) and ok(prefill, decode, KV)
    assert not ok(CLIENT, prefill, KV) and not ok(router, prefill, KV) and not ok(router, decode, KV)
    assert not ok(other["decode"], prefill, KV) and not ok(other["prefill"], decode, KV)
    assert not ok(PROMETHEUS, prefill, KV)
    assert not ok(decode, prefill, 15000)  # Baton's TCP transport: the KV port, nothing else
    # metrics (the pods' metrics port): Prometheus pods, by label, in any namespace (the default: labels are
    # identity, so a pod labelled like Prometheus gets in too; naming the namespace narrows it, below) -- and
    # nothing else: a Baton worker's API is not theirs
    assert ok(PROMETHEUS, prefill, METRICS) and ok(PROMETHEUS, decode, METRICS) and ok(PROMETHEUS, router, METRICS)
    assert not ok(PROMETHEUS, prefill, HTTP) and not ok(PROMETHEUS, decode, HTTP)
    assert not ok(router, prefill, METRICS) and not ok(CLIENT, decode, METRICS) and not ok(decode, prefill, METRICS)
    assert ok(PROMETHEUS_LOOKALIKE, prefill, METRICS)
    # the router: anyone, on its API port; its metrics port (the workers' addresses) only the metrics peers
    assert ok(CLIENT, router, ROUTER_PORT) and ok(OUTSIDER, router, ROUTER_PORT)
    assert not ok(CLIENT, router, METRICS) and not ok(OUTSIDER, router, METRICS)
    assert not ok(CLIENT, router, 9999)


def test_a_worker_on_the_routers_port_number_is_not_opened_to_everyone():
    """Why one policy per role: rules apply to every pod a policy selects, so "router port from anyone" must
    not select the workers, whatever port numbers they share."""
    mine = render(llmservice(prefill={"port": ROUTER_PORT}, decode={"port": ROUTER_PORT}), network=ON)
    nps, p = policies(mine), pods(mine)
    assert allowed(nps, CLIENT, p["router"], ROUTER_PORT, NAMESPACES)
    assert not allowed(nps, CLIENT, p["prefill"], ROUTER_PORT, NAMESPACES)
    assert not allowed(nps, CLIENT, p["decode"], ROUTER_PORT, NAMESPACES)
    assert allowed(nps, p["router"], p["decode"], ROUTER_PORT, NAMESPACES)
    assert not allowed(nps, p["decode"], p["router"], KV, NAMESPACES)


@pytest.mark.parametrize("engine", ["baton", "vllm"])
def test_metrics_are_served_on_the_port_the_policy_opens(engine):
    """The PodMonitor scrapes each pod's container port named `launch.scrape_port_name(role, engine)` (a
    router's and a Baton worker's `metrics`, a vLLM worker's `http`): the port the metrics rule opens to the
    metrics peers, and the only one."""
    from baton import launch

    mine = render(llmservice() if engine == "baton" else vllm(), network=ON)
    nps, pod = policies(mine), pods(mine)
    for role, name in (("prefill", "svc-prefill"), ("decode", "svc-decode"), ("router", "svc-router")):
        metrics_port = pod[role].ports[launch.scrape_port_name(role, engine)]
        assert metrics_port == (HTTP if engine == "vllm" and role != "router" else METRICS)
        np = next(p for p in nps if p["metadata"]["name"] == name)
        rule = next(r for r in np["spec"]["ingress"] if r.get("from") == list(render_network.DEFAULT_METRICS_FROM))
        assert rule["ports"] == [{"protocol": "TCP", "port": metrics_port}]


def test_vllm_workers_open_every_port_to_each_other_only():
    mine = render(vllm(), network=ON)
    nps, p = policies(mine), pods(mine)
    ok = lambda src, dst, port: allowed(nps, src, dst, port, NAMESPACES)
    ucx_port = 45678  # kernel-chosen UCX listener
    assert ok(p["prefill"], p["decode"], ucx_port) and ok(p["decode"], p["prefill"], ucx_port)
    assert ok(p["decode"], p["prefill"], KV)  # NIXL side channel
    assert not ok(CLIENT, p["prefill"], ucx_port) and not ok(p["router"], p["decode"], ucx_port)
    assert not ok(CLIENT, p["prefill"], KV)
    # vLLM serves /metrics on its API port alone: the metrics peers get that port (docs/vllm.md says so)
    assert ok(PROMETHEUS, p["prefill"], HTTP) and not ok(PROMETHEUS, p["prefill"], METRICS)


def test_vllm_pinned_ucx_range_is_opened_port_by_port():
    mine = render(vllm(env=[{"name": "UCX_TCP_PORT_RANGE", "value": "50000-50003"}]), network=ON)
    nps, p = policies(mine), pods(mine)
    ok = lambda src, dst, port: allowed(nps, src, dst, port, NAMESPACES)
    assert all(ok(p["prefill"], p["decode"], port) for port in (KV, 50000, 50001, 50002, 50003))
    assert not ok(p["prefill"], p["decode"], 50004) and not ok(p["prefill"], p["decode"], 45678)
    assert not ok(CLIENT, p["decode"], 50001)
    kv_rule = policies(mine)[0]["spec"]["ingress"][-1]
    assert all("endPort" not in e for e in kv_rule["ports"])  # endPort needs Kubernetes 1.22


@pytest.mark.parametrize("value,expected", [
    ("50000-50003", [KV, 50000, 50001, 50002, 50003]), (" 50010 ", [KV, 50010]), ("0", None), ("a-b", None),
    ("50005-50000", None), ("40000-49999", None),  # more than MAX_LISTED_PORTS: every port between the roles
    (f"{KV}-{KV + 1}", [KV, KV + 1]),
])
def test_ucx_port_range_values(value, expected):
    svc = parse_llmservice(vllm(env=[{"name": "UCX_TCP_PORT_RANGE", "value": value}]))
    assert render_network.kv_ports(svc) == expected
    from_secret = vllm(env=[{"name": "UCX_TCP_PORT_RANGE", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])
    assert render_network.kv_ports(parse_llmservice(from_secret)) is None
    baton_svc = parse_llmservice(llmservice())
    assert render_network.kv_ports(baton_svc) == [KV]


def test_router_from_and_metrics_from_narrow_the_sources():
    spec = {"networkPolicy": {
        "routerFrom": [{"podSelector": {"matchLabels": {"app": "gateway"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                         "podSelector": {"matchExpressions": [
                             {"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}]}}]}}
    mine = render(llmservice(**spec), network=ON)
    nps, p = policies(mine), pods(mine)
    ok = lambda src, dst, port: allowed(nps, src, dst, port, NAMESPACES)
    assert ok(GATEWAY, p["router"], ROUTER_PORT) and not ok(CLIENT, p["router"], ROUTER_PORT)
    assert not ok(OUTSIDER, p["router"], ROUTER_PORT)
    assert ok(PROMETHEUS, p["router"], METRICS) and ok(PROMETHEUS, p["prefill"], METRICS)
    assert not ok(PROMETHEUS, p["router"], ROUTER_PORT)  # routerFrom narrows the API port for Prometheus too
    assert not ok(PROMETHEUS_LOOKALIKE, p["prefill"], METRICS)
    assert not ok(PROMETHEUS_LOOKALIKE, p["router"], METRICS)
    # an empty list is nobody, not everybody
    closed = render(llmservice(networkPolicy={"metricsFrom": [], "routerFrom": []}), network=ON)
    nps, p = policies(closed), pods(closed)
    assert not allowed(nps, PROMETHEUS, p["prefill"], METRICS, NAMESPACES)
    assert not allowed(nps, CLIENT, p["router"], ROUTER_PORT, NAMESPACES)
    assert allowed(nps, p["router"], p["prefill"], HTTP, NAMESPACES)


def test_operator_options_and_the_spec_switch():
    off = NetworkPolicyOptions(enabled=False)
    manifests = render(llmservice(), network=off)
    assert not policies(manifests)
    p = pods(manifests)
    assert allowed([], CLIENT, p["prefill"], KV, NAMESPACES)  # no policy: everything goes (what "off" means)
    assert len(policies(render(llmservice(networkPolicy={"enabled": True}), network=off))) == 3
    assert not policies(render(llmservice(networkPolicy={"enabled": False}), network=ON))
    # the operator's metrics peers (Helm networkPolicy.metricsFrom -> --network-policy-metrics-from)
    peers = render_network.parse_peers(json.dumps([{"namespaceSelector": {"matchLabels": {"x": "y"}}}]))
    custom = NetworkPolicyOptions(metrics_from=peers)
    np = policies(render(llmservice(), network=custom))[0]
    assert {"from": [{"namespaceSelector": {"matchLabels": {"x": "y"}}}], "ports": [{"protocol": "TCP", "port": METRICS}]} \
        in np["spec"]["ingress"]
    for bad in ("{}", "[{}]", '[{"podSelector": {"matchLabels": {"a": 1}}}]', "not json",
                '[{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]'):
        with pytest.raises(ValueError):
            render_network.parse_peers(bad)


def test_configure_sets_the_default(monkeypatch):
    monkeypatch.setattr(render_network, "OPTIONS", render_network.OPTIONS)
    render_network.configure(False, '[{"podSelector": {}}]')
    assert render_network.OPTIONS == NetworkPolicyOptions(enabled=False, metrics_from=({"podSelector": {}},))
    assert not policies(render(llmservice()))
    render_network.configure()
    assert render_network.OPTIONS == NetworkPolicyOptions()


def test_bad_network_policy_specs_name_the_field():
    with pytest.raises(InvalidLLMService) as info:
        render(llmservice(networkPolicy={"routerFrom": [{}]}))
    assert "spec.networkPolicy.routerFrom[0]" in str(info.value)
    with pytest.raises(InvalidLLMService) as info:
        render(llmservice(networkPolicy={"metricsFrom": [{"podSelector": {"matchExpressions": [
            {"key": "a", "operator": "Exists", "values": ["x"]}]}}]}))
    assert "spec.networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].values" in str(info.value)
