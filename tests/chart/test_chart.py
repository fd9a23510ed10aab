"""The Helm chart, rendered offline: lint, security settings, least-privilege RBAC, webhook certificate,
optional monitoring objects, values schema, and the CRD copy kept in sync with crds/llmservice.yaml."""
from __future__ import annotations

import base64
import subprocess

import pytest
from cryptography import x509

from .conftest import CHART, REPO


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in by_kind(docs, kind)])
    return found[0]


def test_helm_lint_strict(helm_bin):
    out = subprocess.run([helm_bin, "lint", "--strict", str(CHART)], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for values in (["--set", "watchNamespaces={a,b}"], ["--set", "clusterWide=true"],
                   ["--set", "webhook.enabled=false,metrics.enabled=false"]):
        out = subprocess.run([helm_bin, "lint", "--strict", str(CHART), *values], capture_output=True, text=True, check=False)
        assert out.returncode == 0, (values, out.stdout + out.stderr)


def test_chart_crd_is_the_generated_one():
    """The chart ships a copy of crds/llmservice.yaml (Helm installs crds/ before templates). One source:
    `baton crd` writes crds/llmservice.yaml; copy it with `cp crds/llmservice.yaml charts/baton/crds/`."""
    assert (CHART / "crds" / "llmservice.yaml").read_text() == (REPO / "crds" / "llmservice.yaml").read_text(), (
        "charts/baton/crds/llmservice.yaml drifted from crds/llmservice.yaml: "
        "run `cp crds/llmservice.yaml charts/baton/crds/llmservice.yaml`")


def test_default_render_objects(render):
    docs = render("--include-crds")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 1
    # No Prometheus Operator in this (offline) render: no ServiceMonitor/PodMonitor/PrometheusRule.
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & set(kinds), kinds
    assert set(kinds) >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Secret",
                          "ConfigMap"}


def test_operator_pod_is_hardened(render):
    dep = one(render(), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    # Ready once its webhook listens: `helm install --wait` then means LLMService writes are admitted
    assert c["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in c["ports"]
    assert c["command"] == ["baton"] and c["args"][:3] == ["operator", "run", "--namespace=baton-system"]
    assert pod["serviceAccountName"] == "baton"
    assert c["image"] == "baton/operator:0.1.0"


def test_image_digest_and_registry(render):
    digest = "sha256:" + "a" * 64
    c = one(render("--set", f"image.registry=registry.example,image.digest={digest}"),
            "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"registry.example/baton/operator@{digest}"


def test_webhook_certificate_and_args(render):
    docs = render("--set", "webhook.certificate.extraIPs={127.0.0.1}", namespace="ops", release="r1")
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    host = "r1-baton-webhook.ops.svc"
    assert f"--webhook-host={host}" in c["args"]
    assert "--webhook-cert=/etc/baton/webhook/tls.crt" in c["args"]
    assert "--webhook-key=/etc/baton/webhook/tls.key" in c["args"]
    svc = one(docs, "Service", "r1-baton-webhook")
    assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
    secret = one(docs, "Secret", "r1-baton-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert base64.b64decode(secret["data"]["tls.key"]).startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/baton/webhook"]["readOnly"] is True


def test_webhook_disabled(render):
    docs = render("--set", "webhook.enabled=false")
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--no-webhook" in c["args"] and not by_kind(docs, "Secret")
    assert not by_kind(docs, "ValidatingWebhookConfiguration")


def test_webhook_configuration_belongs_to_the_chart(render):
    """A Service reference (the apiserver resolves it; a .svc URL would need cluster DNS in the apiserver) and
    the generated certificate as caBundle; the operator is told not to manage it (kopf would need RBAC
    `create` on mutating webhook configurations for that)."""
    docs = render(namespace="ops", release="r1")
    (hook,) = one(docs, "ValidatingWebhookConfiguration", "r1-baton.baton.dev")["webhooks"]
    secret = one(docs, "Secret", "r1-baton-webhook-tls")
    assert hook["clientConfig"]["caBundle"] == secret["data"]["tls.crt"]
    assert hook["clientConfig"]["service"] == {"name": "r1-baton-webhook", "namespace": "ops", "port": 9443,
                                               "path": "/validate-llmservice"}
    assert hook["rules"] == [{"apiGroups": ["baton.dev"], "apiVersions": ["v1alpha1"], "resources": ["llmservices"],
                              "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    env = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "BATON_WEBHOOK_MANAGED", "value": "0"} in env
    docs = render("--set", "webhook.url=https://127.0.0.1:9999")
    (hook,) = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:9999/validate-llmservice"
    assert "service" not in hook["clientConfig"]


def test_webhook_existing_secret_needs_a_ca(helm_bin, render):
    out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", "webhook.certificate.existingSecret=mine"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "caBundle" in out.stderr
    docs = render("--set", "webhook.certificate.existingSecret=mine,webhook.certificate.caBundle=Q0E=")
    assert not by_kind(docs, "Secret")
    assert one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"] == "Q0E="
    vols = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": "mine", "defaultMode": 0o440}} in vols


def _rules(role: dict) -> set[tuple]:
    out = set()
    for r in role["rules"]:
        for group in r["apiGroups"]:
            for res in r["resources"]:
                for verb in r["verbs"]:
                    out.add((group, res, verb, tuple(r.get("resourceNames") or ())))
    return out


#: What the operator does (operator/kube.py, reconcile.py, handlers.py, webhook.py) and what kopf needs.
EXPECTED_CLUSTER = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list", ()),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ()),
    ("", "nodes", "get", ()), ("", "nodes", "list", ()),  # the planner's placement check (rbac.readNodes)
}
CHILD_VERBS = ("get", "list", "watch", "create", "patch", "delete")
EXPECTED_WORKLOADS = (
    {("baton.dev", "llmservices", v, ()) for v in ("get", "list", "watch", "patch")}
    | {("baton.dev", "llmservices/status", "patch", ()), ("apps", "deployments/scale", "patch", ()),
       ("", "events", "create", ())}
    | {("apps", "deployments", v, ()) for v in CHILD_VERBS}
    | {("", res, v, ()) for res in ("services", "serviceaccounts") for v in CHILD_VERBS}
    | {("rbac.authorization.k8s.io", res, v, ()) for res in ("roles", "rolebindings") for v in CHILD_VERBS}
    | {("networking.k8s.io", "networkpolicies", v, ()) for v in CHILD_VERBS}  # each role's ingress policy
    | {("", "endpoints", "get", ())}  # granted on to each router (RBAC: only what the granter holds)
    | {("", "secrets", "create", ())}  # the KV secret: made, never read
    | {("", "pods", "list", ())}  # uri sources: the download's failure message, from the init container
)


def test_rbac_is_exactly_what_the_operator_uses(render):
    docs = render("--set", "clusterWide=true")
    assert _rules(one(docs, "ClusterRole", "baton-cluster")) == EXPECTED_CLUSTER
    assert _rules(one(docs, "ClusterRole", "baton")) == EXPECTED_WORKLOADS
    for role in by_kind(docs, "ClusterRole"):
        for r in role["rules"]:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
            if "pods" in r["resources"]:  # read-only, and only listed
                assert r["verbs"] == ["list"]
            if "secrets" in r["resources"]:  # the KV secrets are made, never read
                assert r["verbs"] == ["create"]
    bindings = {b["metadata"]["name"]: b for b in by_kind(docs, "ClusterRoleBinding")}
    assert set(bindings) == {"baton", "baton-cluster"}
    for b in bindings.values():
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "baton", "namespace": "baton-system"}]
    assert not by_kind(docs, "RoleBinding")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not [a for a in args if a.startswith("--namespace")]


def test_nodes_are_read_only_and_only_when_asked(render):
    nodes = {("", "nodes", "get", ()), ("", "nodes", "list", ())}
    assert _rules(one(render("--set", "rbac.readNodes=false"), "ClusterRole", "baton-cluster")) == \
        EXPECTED_CLUSTER - nodes


def test_the_default_operator_is_namespaced_to_its_release(render):
    """Default values: the workload rights are bound in the release's namespace only (a RoleBinding), the
    operator watches only it; the one cluster-wide binding left is read-only: kopf's view of CRDs, the planner's of nodes."""
    docs = render(namespace="team-x")
    assert [b["metadata"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["baton-cluster"]
    assert _rules(one(docs, "ClusterRole", "baton-cluster")) == EXPECTED_CLUSTER
    (rb,) = by_kind(docs, "RoleBinding")
    assert rb["metadata"]["namespace"] == "team-x"
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "baton"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "baton", "namespace": "team-x"}]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-x" in args and "--all-namespaces" not in args


def test_cluster_wide_and_a_namespace_list_are_refused_together(helm_bin):
    out = subprocess.run([helm_bin, "template", "baton", str(CHART), "--set", "clusterWide=true",
                          "--set", "watchNamespaces={a}"], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode != 0 and "clusterWide=true manages every namespace" in out.stderr, out.stderr


def test_rbac_namespaced_mode_binds_workloads_per_namespace(render):
    docs = render("--set", "watchNamespaces={team-a,team-b}")
    assert [b["metadata"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["baton-cluster"]
    rbs = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in rbs) == ["team-a", "team-b"]
    assert all(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "baton"}
               for b in rbs)
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_monitoring_objects_only_with_the_prometheus_operator(render):
    docs = render("--api-versions", "monitoring.coreos.com/v1")
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True and sm["spec"]["endpoints"][0]["port"] == "metrics"
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "baton-operator"}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    # vLLM series carry no llmservice/role labels: they come from the pods' labels (the operator's names)
    import re

    from baton.operator.labels import LABEL_LLMSERVICE, LABEL_ROLE

    from baton import launch

    meta = lambda label: "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
    for endpoint in pm["spec"]["podMetricsEndpoints"]:
        relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"] if "targetLabel" in r}
        assert relabel[launch.Label.LLMSERVICE] == [meta(LABEL_LLMSERVICE)]
        assert relabel[launch.Label.ROLE] == [meta(LABEL_ROLE)]
        assert relabel[launch.Label.NAMESPACE] == ["__meta_kubernetes_namespace"]
    metrics_svc = one(docs, "Service", "baton-metrics")
    assert metrics_svc["spec"]["ports"][0]["port"] == 8080
    docs = render("--api-versions", "monitoring.coreos.com/v1", "--set", "metrics.podMonitor.enabled=false",
                  "--set", "metrics.serviceMonitor.enabled=false")
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PodMonitor")


@pytest.mark.parametrize("bad", [
    "replicaCount=2", "logLevel=trace", "webhook.port=80", "watchNamespaces={Bad_NS}", "image.digest=latest",
    "nosuchkey=1", "metrics.serviceMonitor.interval=often",
])
def test_schema_refuses_bad_values(helm_bin, bad):
    out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", bad], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, (
        bad, out.stderr)


@pytest.mark.parametrize("example", ["tiny-local.yaml", "smollm2-vllm-cpu.yaml"])
def test_the_pod_monitor_scrapes_each_pod_once_on_its_metrics_port(render, example):
    """The PodMonitor evaluated as the Prometheus Operator does (an endpoint's port must be a named container
    port of the pod; its keep/drop relabelings filter on the pod's labels) against the pods the operator renders
    (Baton engine and vLLM): every pod is scraped exactly once, on `launch.scrape_port_name(role, engine)` -- a
    router and a Baton worker on their metrics port (never a router's client-facing port, never a Baton worker's
    API port), a vLLM worker on its HTTP port."""
    import re

    import yaml
    from baton.operator.labels import LABEL_ENGINE, LABEL_ROLE
    from baton.operator.render import render as render_llmservice

    from baton import launch

    pm = one(render("--api-versions", "monitoring.coreos.com/v1"), "PodMonitor")
    body = yaml.safe_load((REPO / "examples" / example).read_text())
    body["metadata"].setdefault("namespace", "demo")
    pods = [d["spec"]["template"] for d in render_llmservice(body) if d["kind"] == "Deployment"]
    assert len(pods) == 3
    for pod in pods:
        labels = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                  for k, v in pod["metadata"]["labels"].items()}
        names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        scraped = []
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            if endpoint["port"] not in names:
                continue
            kept = True
            for rule in endpoint["relabelings"]:
                if rule.get("action") in ("keep", "drop"):
                    value = ";".join(labels.get(src, "") for src in rule["sourceLabels"])
                    hit = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
                    kept = kept and (hit if rule["action"] == "keep" else not hit)
            if kept:
                scraped.append(endpoint["port"])
        role, engine = pod["metadata"]["labels"][LABEL_ROLE], pod["metadata"]["labels"].get(LABEL_ENGINE)
        assert scraped == [launch.scrape_port_name(role, engine)], (role, engine, scraped)
        assert (engine == launch.ENGINE_VLLM and role != "router") == (scraped == [launch.HTTP_PORT_NAME])
