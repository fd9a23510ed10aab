"""The chart on the REAL local control plane: `helm install`, the operator it deploys reconciling an LLMService
with the chart's ServiceAccount token, and RBAC proven minimal against the real apiserver.

The operator pod is run as a local process by the node agent (e2e/procrunner.py) with the pod's own
ServiceAccount token, its mounted webhook certificate and the chart's arguments; only its network identity is
adapted: the apiserver here cannot reach a Service's DNS name, so the webhook host becomes 127.0.0.1 (the
chart's certificate gets that IP as an extra SAN) and the ports become free loopback ports.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from baton.e2e.processes import wait_for
from baton.e2e.procrunner import ProcessPodRunner
from baton.worker.local_fleet import free_port

from .conftest import CHART, REPO

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "tiny-local.yaml"



def operator_supports(flag: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "baton.cli", "operator", "run", "--help"],
                         capture_output=True, text=True, check=False, timeout=60)
    return flag in out.stdout


def localize(args: list[str]) -> list[str]:
    """The pod's network identity, adapted to a local process (see the module docstring)."""
    ports = {"--metrics-port": free_port()}  # the webhook port is fixed at install (webhook.url)
    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        if key == "--webhook-host":
            arg = "--webhook-host=127.0.0.1"
        elif key == "--webhook-listen":
            arg = "--webhook-listen=127.0.0.1"
        elif key in ports:
            arg = f"{key}={ports[key]}"
        elif key == "--liveness":
            arg = f"--liveness=http://127.0.0.1:{free_port()}/healthz"
        out.append(arg)
    return out


class Helm:
    def __init__(self, binary: str, kubeconfig: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([self.binary, "--kubeconfig", str(self.kubeconfig), *args],
                             capture_output=True, text=True, check=False, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out


@pytest.fixture(scope="module")
def helm(helm_bin, kubeconfig):
    return Helm(helm_bin, kubeconfig)


def sa_kubectl(kubectl, token: str, cluster, tmp: Path):
    """kubectl authenticated only by the given ServiceAccount token (its own kubeconfig, no client cert)."""
    cfg = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                                  "certificate-authority": str(cluster.pki.ca_crt)}}],
           "users": [{"name": "sa", "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}], "current-context": "sa"}
    path = tmp / f"sa-{uuid.uuid4().hex[:6]}.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))

    def run(*args: str, **kw):
        return kubectl(*args, kubeconfig=path, **kw)
    return run


def service_account_token(kubectl, namespace: str, sa: str) -> str:
    def token():
        secrets = json.loads(kubectl("get", "sa", sa, "-n", namespace, "-o", "json", check=True).stdout)
        names = [s["name"] for s in secrets.get("secrets") or []]
        return names and names[0]
    name = wait_for(f"the token of ServiceAccount {namespace}/{sa}", token, timeout=30)
    out = kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data.token}", check=True).stdout
    import base64
    return base64.b64decode(out).decode()


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def release(local_cluster, kubectl, helm, tmp_path_factory):
    """`helm install` of the chart into a fresh namespace, its operator pod run by the node agent."""
    ns = f"baton-system-{uuid.uuid4().hex[:6]}"
    name = "baton"
    agent = local_cluster.agent
    assert agent is not None, "the session cluster runs no node agent"

    def is_operator(pod: dict) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return (pod["metadata"]["namespace"] == ns and labels.get("app.kubernetes.io/component") == "operator"
                and labels.get("app.kubernetes.io/instance") == name)

    runner = ProcessPodRunner(local_cluster, is_operator, rewrite_args=localize, fallback=agent.runner,
                              workdir=tmp_path_factory.mktemp("operator-pod"))
    previous, agent.runner = agent.runner, runner
    port = free_port()
    # cluster-wide (an explicit value; the default is namespaced, tested below): the tests' LLMServices live in
    # namespaces of their own
    values = ["--set", "clusterWide=true", "--set", "webhook.certificate.extraIPs={127.0.0.1}",
              "--set", f"webhook.port={port}", "--set", f"webhook.url=https://127.0.0.1:{port}"]
    if not operator_supports("--metrics-port"):
        values += ["--set", "metrics.enabled=false"]  # `baton operator run` has no metrics server yet
    install = None
    try:
        install = helm("install", name, str(CHART), "-n", ns, "--create-namespace", "--wait", "--timeout", "120s",
                       *values)
        # The node agent reports the operator's pod Ready once its process runs (helm's --wait sees only that);
        # the operator itself may still be importing on a loaded machine. The apiserver calls its webhook from
        # the first apply on: wait until it listens (a real kubelet's readiness probe would gate the same).
        wait_for("the operator's webhook to listen", lambda: _listening("127.0.0.1", port), timeout=180,
                 diagnostics=runner.log_tail)
        yield {"namespace": ns, "name": name, "runner": runner, "install": install, "webhook_port": port}
    finally:
        try:
            helm("uninstall", name, "-n", ns, "--wait", "--timeout", "60s", check=False)
            wait_for("the operator process to stop", lambda: not runner.procs, timeout=30)
        finally:
            runner.stop_all()
            agent.runner = previous
            kubectl("delete", "namespace", ns, "--wait=false")


def test_helm_install_runs_the_operator_which_reconciles(release, kubectl, namespace, local_cluster, tmp_path):
    ns, runner = release["namespace"], release["runner"]
    assert "kubectl get llms" in release["install"].stdout  # NOTES.txt
    assert len(runner.procs) == 1, runner.log_tail()
    proc = next(iter(runner.procs.values()))
    assert proc.poll() is None, runner.log_tail()
    argv = next(iter(runner.argv.values()))
    assert "--all-namespaces" in argv

    # The chart's webhook configuration and certificate: the apiserver calls the operator over TLS, trusting
    # the chart's caBundle (the operator serves the mounted Secret's certificate), and the operator did not
    # create one of its own.
    assert kubectl("get", "validatingwebhookconfiguration", "baton.dev").returncode != 0
    assert kubectl("get", "mutatingwebhookconfiguration", "baton.dev").returncode != 0
    bad = yaml.safe_load(EXAMPLE.read_text())
    bad["metadata"].update(name="bad", namespace=namespace)
    bad["spec"]["prefill"]["tensorParallel"] = 3
    out = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))
    assert out.returncode != 0 and "power of two" in out.stderr, (out.stderr, runner.log_tail())

    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = namespace
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)
    name = body["metadata"]["name"]

    def ready():
        status = json.loads(kubectl("get", "llms", name, "-n", namespace, "-o", "json", check=True).stdout)
        return (status.get("status") or {}).get("phase") == "Ready"
    wait_for(f"LLMService {namespace}/{name} Ready", ready, timeout=90, diagnostics=runner.log_tail)
    deps = json.loads(kubectl("get", "deployments", "-n", namespace, "-o", "json", check=True).stdout)["items"]
    assert {d["metadata"]["name"] for d in deps} == {f"{name}-prefill", f"{name}-decode", f"{name}-router"}
    # the per-role NetworkPolicies (networking.k8s.io), made with the chart's RBAC
    nps = json.loads(kubectl("get", "networkpolicies", "-n", namespace, "-o", "json", check=True).stdout)["items"]
    assert {n["metadata"]["name"] for n in nps} == {f"{name}-prefill", f"{name}-decode", f"{name}-router"}
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout)["items"]
    assert any(e["reason"] == "Created" and e["involvedObject"]["kind"] == "LLMService" for e in events)

    # It acted with the chart's ServiceAccount: the children's managedFields name the operator's field
    # manager, and the operator never hit a permission error.
    # (A 403 for "namespace is being terminated" — earlier tests' namespaces going away — is not RBAC.)
    log_text = runner.log_tail(400)
    assert not re.search(r'forbidden: User "[^"]+" cannot', log_text), log_text
    for marker in ("Not enough RBAC", "Not enough permissions"):
        assert marker not in log_text, log_text
    sa_token = service_account_token(kubectl, ns, "baton")
    who = sa_kubectl(kubectl, sa_token, local_cluster, tmp_path)("auth", "can-i", "patch", "llmservices.baton.dev/status", "-n", namespace)
    assert who.stdout.strip() == "yes"


CAN = [
    ("list", "llmservices.baton.dev", "--all-namespaces"),
    ("watch", "llmservices.baton.dev", "--all-namespaces"),
    ("patch", "llmservices.baton.dev", "-n", "{other}"),
    ("patch", "llmservices.baton.dev/status", "-n", "{other}"),
    ("create", "deployments.apps", "-n", "{other}"),
    ("patch", "deployments.apps/scale", "-n", "{other}"),
    ("delete", "services", "-n", "{other}"),
    ("create", "events", "-n", "{other}"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    # the router's discovery grant (a Role + RoleBinding per LLMService): RBAC itself refuses a binding to
    # anything the operator does not hold (no `bind`/`escalate` verbs, tested below)
    ("create", "rolebindings.rbac.authorization.k8s.io", "-n", "{other}"),
    ("create", "secrets", "-n", "{other}"),  # the per-service KV secret: made, never read
    ("list", "pods", "-n", "{other}"),  # a uri source's download failure, from the init container
    ("create", "networkpolicies.networking.k8s.io", "-n", "{other}"),  # each role's ingress policy
    ("delete", "networkpolicies.networking.k8s.io", "-n", "{other}"),  # pruned when switched off
    ("list", "nodes"),  # the planner's placement check (rbac.readNodes): read-only
]
CANNOT = [
    ("get", "secrets", "--all-namespaces"),
    ("list", "secrets", "--all-namespaces"),
    ("get", "secrets", "-n", "{own}"),
    ("list", "secrets", "-n", "kube-system"),
    ("create", "pods", "-n", "{other}"),
    ("get", "pods", "-n", "{other}"),
    ("create", "pods/exec", "-n", "{other}"),
    ("create", "statefulsets.apps", "-n", "{other}"),
    ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io", "-n", "{other}"),
    ("patch", "secrets", "-n", "{other}"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("delete", "namespaces"),
    ("patch", "nodes"),
    ("delete", "nodes"),
    ("create", "pods/eviction", "-n", "{other}"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/baton-baton.dev"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "llmservices.baton.dev", "-n", "{other}"),
    ("update", "deployments.apps", "-n", "{other}"),
]


def test_rbac_cluster_mode_is_minimal(release, kubectl, namespace, local_cluster, tmp_path):
    token = service_account_token(kubectl, release["namespace"], "baton")
    as_sa = sa_kubectl(kubectl, token, local_cluster, tmp_path)
    fmt = {"other": namespace, "own": release["namespace"]}
    for case, expected in [(c, "yes") for c in CAN] + [(c, "no") for c in CANNOT]:
        args = [a.format(**fmt) for a in case]
        out = as_sa("auth", "can-i", *args)
        assert out.stdout.strip() == expected, (args, expected, out.stdout, out.stderr)

    # Real calls, not only the authorizer's answer: Secrets stay unreadable, everywhere.
    kubectl("create", "secret", "generic", "precious", "-n", namespace, "--from-literal=k=v", check=True)
    for args in (["get", "secrets", "-A"], ["get", "secret", "precious", "-n", namespace],
                 ["get", "secrets", "-n", release["namespace"]], ["get", "pod", "any", "-n", namespace]):
        out = as_sa(*args)
        assert out.returncode != 0 and "Forbidden" in out.stderr, (args, out.stdout, out.stderr)
    # What it may do, done for real: server-side apply of a child, then delete it.
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "probe", "namespace": namespace}}
    out = as_sa("apply", "--server-side", "--field-manager=baton-operator", "-f", "-", input=json.dumps(sa))
    assert out.returncode == 0, out.stderr
    assert as_sa("delete", "serviceaccount", "probe", "-n", namespace).returncode == 0
    # ConfigMaps are no child of an LLMService any more: not even those
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe", "namespace": namespace}}
    out = as_sa("apply", "--server-side", "--field-manager=baton-operator", "-f", "-", input=json.dumps(cm))
    assert out.returncode != 0 and "Forbidden" in out.stderr


@pytest.mark.parametrize("values", ["default", "watchNamespaces"])
def test_rbac_namespaced_mode_cannot_touch_other_namespaces(local_cluster, kubectl, helm, namespace, tmp_path,
                                                            values):
    """The chart's default (the release's own namespace) and watchNamespaces: the child kinds and LLMServices
    are granted only in the watched namespaces (RoleBindings), nowhere else."""
    ns = f"baton-ns-{uuid.uuid4().hex[:6]}"
    name = f"scoped-{uuid.uuid4().hex[:4]}"
    other = f"t-other-{uuid.uuid4().hex[:6]}"
    watched = ns if values == "default" else namespace
    kubectl("create", "namespace", other, check=True)
    try:
        # replicaCount=0: only the RBAC objects matter here (the other test runs the operator).
        extra = [] if values == "default" else ["--set", f"watchNamespaces={{{namespace}}}"]
        helm("install", name, str(CHART), "-n", ns, "--create-namespace", "--skip-crds", *extra,
             "--set", "replicaCount=0", "--set", "webhook.enabled=false")
        token = service_account_token(kubectl, ns, f"{name}-baton")
        as_sa = sa_kubectl(kubectl, token, local_cluster, tmp_path)
        checked = []
        for verb, res in (("create", "deployments.apps"), ("patch", "llmservices.baton.dev/status"),
                          ("list", "services"), ("create", "secrets"), ("create", "rolebindings.rbac.authorization.k8s.io")):
            assert as_sa("auth", "can-i", verb, res, "-n", watched).stdout.strip() == "yes", (verb, res)
            for elsewhere in (other, "default", "kube-system"):
                assert as_sa("auth", "can-i", verb, res, "-n", elsewhere).stdout.strip() == "no", (verb, res, elsewhere)
            checked.append(f"{verb} {res}")
        print(f"{values}: yes in {watched}, no in {other}/default/kube-system for: {'; '.join(checked)}")
        assert as_sa("auth", "can-i", "list", "llmservices.baton.dev", "--all-namespaces").stdout.strip() == "no"
        kubectl("create", "configmap", "theirs", "-n", other, check=True)
        for args in (["get", "configmap", "theirs", "-n", other], ["delete", "configmap", "theirs", "-n", other],
                     ["get", "deployments", "-n", other]):
            out = as_sa(*args)
            assert out.returncode != 0 and "Forbidden" in out.stderr, (args, out.stderr)
    finally:
        helm("uninstall", name, "-n", ns, check=False)
        kubectl("delete", "namespace", ns, other, "--wait=false")
