"""The operator against a REAL kube-apiserver, controller-manager and scheduler (the local control plane).

The operator runs as a separate process (`baton operator run`), exactly as a user would run it, so these
tests also cover the CLI, the admission webhook's TLS set-up and restart behaviour.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

from baton.e2e.fixtures import api_get, condition, get_json, get_llmservice
from baton.e2e.processes import OperatorProcess as Operator
from baton.e2e.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-local.yaml"
BAD = sorted((REPO / "tests" / "operator" / "bad").glob("*.yaml"))


def llms_status(kubectl, ns: str, name: str) -> dict:
    """(Read in-process, `api_get`: what the waits poll.)"""
    return (get_llmservice(name, ns) or {}).get("status") or {}


def apply_example(kubectl, ns: str, **spec_overrides) -> dict:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = ns
    for key, value in spec_overrides.items():
        body["spec"][key] = value
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)
    return body


def wait_ready(kubectl, ns: str, name: str, operator: Operator, timeout: float = 90) -> dict:
    try:
        return wait_for(f"LLMService {ns}/{name} to be Ready",
                        lambda: (s := llms_status(kubectl, ns, name)).get("phase") == "Ready" and s, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{operator.log_tail()}") from None


def deployments(kubectl, ns: str, name: str) -> dict[str, dict]:
    items = api_get(f"/apis/apps/v1/namespaces/{ns}/deployments",
                    query={"labelSelector": f"app.kubernetes.io/instance={name}"})["items"]
    return {d["metadata"]["name"]: d for d in items}


def test_apply_example_schedules_roles_on_their_pools_and_becomes_ready(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    status = wait_ready(kubectl, namespace, name, operator)

    deps = deployments(kubectl, namespace, name)
    assert set(deps) == {f"{name}-prefill", f"{name}-decode", f"{name}-router"}
    assert status["observedGeneration"] == get_json(kubectl, "llmservice", name, "-n", namespace)["metadata"]["generation"]
    for cond in ("Ready", "PrefillReady", "DecodeReady", "RouterReady"):
        assert condition(status, cond)["status"] == "True", status
    assert status["prefill"]["readyReplicas"] == body["spec"]["prefill"].get("replicas", 1)
    assert status["endpoint"] == f"http://{name}.{namespace}.svc:80"

    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in get_json(kubectl, "nodes")["items"]}
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")["items"]
    placed = {}
    for pod in pods:
        role = pod["metadata"]["labels"]["baton.dev/role"]
        placed.setdefault(role, set()).add(pod["spec"]["nodeName"])
    for role in ("prefill", "decode"):
        wanted = body["spec"][role]["nodeSelector"]
        assert placed[role], f"no {role} pods placed"
        for node in placed[role]:
            assert all(nodes[node].get(k) == v for k, v in wanted.items()), (role, node, nodes[node])

    events = get_json(kubectl, "events", "-n", namespace, "--field-selector",
                      f"involvedObject.kind=LLMService,involvedObject.name={name}")["items"]
    reasons = {e["reason"] for e in events}
    assert "Created" in reasons and "PhaseReady" in reasons, reasons


def test_printer_columns(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    wait_ready(kubectl, namespace, body["metadata"]["name"], operator)
    out = kubectl("get", "llms", "-n", namespace, check=True).stdout
    header = out.splitlines()[0].split()
    for column in ("READY", "PREFILL", "DECODE", "TTFT-P90", "TPOT-P90", "SLO", "AGE"):
        assert column in header, out
    row = out.splitlines()[1].split()
    assert row[0] == body["metadata"]["name"] and row[header.index("READY")] == "True", out
    prefill, decode = (body["spec"][role].get("replicas", 1) for role in ("prefill", "decode"))
    assert row[header.index("PREFILL")] == f"{prefill}/{prefill}", out
    assert row[header.index("DECODE")] == f"{decode}/{decode}", out


def test_drift_is_corrected(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    before = deployments(kubectl, namespace, name)[f"{name}-decode"]["metadata"]["uid"]

    kubectl("delete", "deployment", f"{name}-decode", "-n", namespace, "--wait=false", check=True)
    wait_for("the deleted decode Deployment to be recreated",
             lambda: (d := deployments(kubectl, namespace, name).get(f"{name}-decode"))
             and d["metadata"]["uid"] != before, timeout=30)

    image = deployments(kubectl, namespace, name)[f"{name}-prefill"]["spec"]["template"]["spec"]["containers"][0]["image"]
    kubectl("set", "image", f"deployment/{name}-prefill", "worker=evil/image:latest", "-n", namespace, check=True)
    wait_for("the edited prefill image to be restored",
             lambda: deployments(kubectl, namespace, name)[f"{name}-prefill"]["spec"]["template"]["spec"]
             ["containers"][0]["image"] == image, timeout=30)
    wait_ready(kubectl, namespace, name, operator)
    events = get_json(kubectl, "events", "-n", namespace, "--field-selector",
                      f"involvedObject.kind=LLMService,involvedObject.name={name}")["items"]
    assert any(e["reason"] == "Updated" and f"{name}-prefill" in e["message"] for e in events)


def test_spec_change_rolls_out_and_updates_status(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    kubectl("patch", "llmservice", name, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"decode": {"replicas": 3}}}), check=True)
    status = wait_for("3 ready decode replicas in status",
                      lambda: (s := llms_status(kubectl, namespace, name)).get("decode", {}).get("readyReplicas") == 3
                      and s.get("phase") == "Ready" and s, timeout=60)
    assert status["observedGeneration"] == 2
    assert deployments(kubectl, namespace, name)[f"{name}-decode"]["spec"]["replicas"] == 3


def test_autoscaled_replicas_are_not_fought(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace, autoscaling={"enabled": True,
                                                          "prometheusURL": "http://prometheus.monitoring:9090"})
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    # Someone else (the autoscaler) scales decode; a spec change that makes the reconciler re-apply must keep it.
    kubectl("scale", f"deployment/{name}-decode", "--replicas=4", "-n", namespace, check=True)
    kubectl("patch", "llmservice", name, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"router": {"replicas": 1}}}), check=True)
    wait_for("the router change to be applied",
             lambda: deployments(kubectl, namespace, name)[f"{name}-router"]["spec"]["replicas"] == 1, timeout=30)
    time.sleep(1.0)
    assert deployments(kubectl, namespace, name)[f"{name}-decode"]["spec"]["replicas"] == 4


def test_deletion_cleans_up(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    kubectl("delete", "llmservice", name, "-n", namespace, check=True)

    def gone():
        left = []
        for kind in ("deployments", "services", "configmaps", "serviceaccounts", "pods"):
            items = get_json(kubectl, kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")["items"]
            left += [f"{kind}/{i['metadata']['name']}" for i in items]
        return not left or None

    wait_for("all children to be garbage-collected", gone, timeout=60)


def test_restart_converges_without_duplicates(operator, kubectl, namespace):
    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    uids = {n: d["metadata"]["uid"] for n, d in deployments(kubectl, namespace, name).items()}

    operator.kill()
    # Changed while the operator is down (no webhook either, so bypass it by editing a child directly).
    kubectl("delete", "deployment", f"{name}-router", "-n", namespace, "--wait=false", check=True)
    operator.start(kubeconfig_flag=True)
    wait_for("the router Deployment to be recreated after restart",
             lambda: f"{name}-router" in deployments(kubectl, namespace, name), timeout=60)
    wait_ready(kubectl, namespace, name, operator)
    after = deployments(kubectl, namespace, name)
    assert set(after) == set(uids), "duplicate or missing Deployments after restart"
    assert after[f"{name}-prefill"]["metadata"]["uid"] == uids[f"{name}-prefill"]
    for kind in ("services", "configmaps", "serviceaccounts"):
        items = get_json(kubectl, kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")["items"]
        names = [i["metadata"]["name"] for i in items]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifests_are_refused_without_disturbing_running_ones(operator, kubectl, namespace, path):
    good = apply_example(kubectl, namespace)
    name = good["metadata"]["name"]
    before = get_json(kubectl, "llmservice", name, "-n", namespace)["metadata"]

    header = dict(line[2:].split(":", 1) for line in path.read_text().splitlines()
                  if line.startswith(("# expect:", "# field:")))
    field_path = header["field"].strip()
    bad = yaml.safe_load(path.read_text())
    bad["metadata"]["namespace"] = namespace
    # Default kubectl validates against the published schema client-side; with --validate=false only the
    # apiserver (schema) and the webhook stand in the way, as for any other API client.
    for client_side in (True, False):
        if path.stem == "unknown-field" and not client_side:
            continue  # Kubernetes 1.20 prunes unknown fields server-side instead of refusing them
        args = ["apply", "-f", "-"] + ([] if client_side else ["--validate=false"])
        out = kubectl(*args, input=yaml.safe_dump(bad))
        assert out.returncode != 0, f"{path.name} was accepted (client-side validation {client_side})"
        message = out.stderr + out.stdout
        # Each layer names the field in its own spelling (kubectl: `ValidationError(LLMService.spec.model):
        # missing required field "name"`; apiserver: `spec.slo.attainment: Invalid value`; webhook: ours).
        spellings = {field_path, field_path.replace("[", ".").replace("]", ""), field_path.split("[")[0]}
        parent, _, leaf = field_path.rpartition(".")
        named = any(s in message for s in spellings) or (parent in message and f'"{leaf}"' in message)
        assert named, f"{path.name}: message does not name {field_path}: {message}"
        assert "Traceback" not in message

    after = get_json(kubectl, "llmservice", name, "-n", namespace)["metadata"]
    assert after["generation"] == before["generation"]
    assert get_json(kubectl, "llmservice", "-n", namespace)["items"].__len__() == 1


def test_missing_kubeconfig_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "baton.cli", "operator", "run", "--kubeconfig",
                          str(tmp_path / "nope")], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_clean_exit_removes_the_webhook_configuration(operator, kubectl, namespace):
    # Left behind, a webhook pointing at a stopped operator (failurePolicy Fail) would refuse every LLMService.
    operator.stop()
    assert kubectl("get", "validatingwebhookconfiguration", "baton.dev").returncode != 0, operator.log_tail()
    apply_example(kubectl, namespace)  # accepted with no operator running
    operator.start()
    wait_for("the webhook configuration to be registered again",
             lambda: kubectl("get", "validatingwebhookconfiguration", "baton.dev").returncode == 0, timeout=60,
             diagnostics=operator.log_tail)


def test_kv_secret_is_made_required_and_rotated_never_logged(operator, kubectl, namespace):
    import base64

    body = apply_example(kubectl, namespace)
    name = body["metadata"]["name"]
    wait_ready(kubectl, namespace, name, operator)
    secret = get_json(kubectl, "secret", f"{name}-kv", "-n", namespace)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 40  # 32 random bytes, url-safe
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "LLMService"  # goes with the service
    for role in ("prefill", "decode"):
        pod_spec = deployments(kubectl, namespace, name)[f"{name}-{role}"]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
        assert env["BATON_KV_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": f"{name}-kv", "key": "token"}

    kubectl("annotate", "llmservice", name, "-n", namespace, "baton.dev/rotate-kv-secret=r1", check=True)

    def rotated_ref():
        refs = set()
        for n, d in deployments(kubectl, namespace, name).items():
            if n.endswith("-router"):
                continue
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            refs.add(env["BATON_KV_SECRET"]["valueFrom"]["secretKeyRef"]["name"])
        return len(refs) == 1 and (ref := refs.pop()) != f"{name}-kv" and ref

    new_name = wait_for("the workers to refer to a rotated KV secret", rotated_ref, timeout=60)
    assert new_name.startswith(f"{name}-kv-")
    rotated = wait_for("the rotated KV secret to exist", lambda: (
        out := kubectl("get", "secret", new_name, "-n", namespace, "-o", "json")).returncode == 0
        and json.loads(out.stdout), timeout=60)
    new_token = base64.b64decode(rotated["data"]["token"]).decode()
    assert new_token != token
    events = json.dumps(get_json(kubectl, "events", "-n", namespace))
    log = operator.log_tail(100000)
    for t in (token, new_token):
        assert t not in events and t not in log, "a KV token leaked into an Event or the operator's log"
    assert "KVSecretRotated" in events


def test_kv_secret_planted_by_someone_else_starts_no_worker(operator, kubectl, namespace):
    """A Secret under the KV Secret's fixed name that the operator did not make (it cannot read it: it only
    gets a 409) is never given to workers: KVSecretConflict, no worker Deployment, a Warning Event; deleted, the
    operator makes its own and the service comes up. Also: the per-role NetworkPolicies are applied."""
    import base64

    body = yaml.safe_load(EXAMPLE.read_text())
    name = body["metadata"]["name"] = "planted"
    body["metadata"]["namespace"] = namespace
    planted = "known-to-someone-else"
    kubectl("create", "secret", "generic", f"{name}-kv", "-n", namespace, f"--from-literal=token={planted}",
            check=True)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)

    def conflict():
        cond = condition(llms_status(kubectl, namespace, name), "KVSecretReady")
        return cond.get("reason") == "KVSecretConflict" and cond
    try:
        cond = wait_for("condition KVSecretReady=False/KVSecretConflict", conflict, timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{operator.log_tail()}") from None
    assert f"Secret {namespace}/{name}-kv" in cond["message"] and cond["status"] == "False"
    status = llms_status(kubectl, namespace, name)
    assert status["phase"] == "Failed" and condition(status, "Ready")["reason"] == "KVSecretConflict"
    assert set(deployments(kubectl, namespace, name)) == {f"{name}-router"}, "a worker got the planted Secret"
    nps = get_json(kubectl, "networkpolicies", "-n", namespace)["items"]
    assert {n["metadata"]["name"] for n in nps} == {f"{name}-prefill", f"{name}-decode", f"{name}-router"}
    events = get_json(kubectl, "events", "-n", namespace)["items"]
    assert any(e["reason"] == "KVSecretConflict" and e["type"] == "Warning" for e in events)
    time.sleep(3)  # later reconciles (child events) change nothing
    assert set(deployments(kubectl, namespace, name)) == {f"{name}-router"}

    kubectl("delete", "secret", f"{name}-kv", "-n", namespace, check=True)
    wait_ready(kubectl, namespace, name, operator, timeout=150)  # the next resync (60 s) makes the Secret
    secret = get_json(kubectl, "secret", f"{name}-kv", "-n", namespace)
    assert base64.b64decode(secret["data"]["token"]).decode() != planted
    status = llms_status(kubectl, namespace, name)
    assert secret["metadata"]["uid"] == status["kvSecrets"][f"{name}-kv"]
    assert condition(status, "KVSecretReady")["status"] == "True"
    assert planted not in operator.log_tail(100000)
