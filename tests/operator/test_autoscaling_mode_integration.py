"""`spec.<role>.autoscaling.mode: external` against a REAL kube-apiserver (the local control plane) and the
operator as a process (`baton operator run`): a `kubectl scale` of the role Deployment -- what an HPA or KEDA
does through the same /scale subresource -- stays across reconciles, also reconciles that re-apply that very
Deployment, and switching a role from off to external keeps its replicas (the operator hands the field over
instead of letting Kubernetes reset it to 1). The pure decisions: test_autoscaling_mode.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

from baton.e2e.fixtures import api_get, get_json, get_llmservice
from baton.e2e.processes import OperatorProcess as Operator
from baton.e2e.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-local.yaml"
#: reconciles to sit through after a `kubectl scale`
RECONCILES = 4


def apply(kubectl, ns: str, decode: dict) -> str:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = ns
    body["spec"]["decode"].update(decode)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)
    return body["metadata"]["name"]


def llms(kubectl, ns: str, name: str) -> dict:
    """(Read in-process, `api_get`: what the waits poll.)"""
    return get_llmservice(name, ns)


def decode_deployment(kubectl, ns: str, name: str) -> dict:
    return api_get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}-decode")


def replicas_owners(deployment: dict) -> set[str]:
    return {e["manager"] for e in deployment["metadata"].get("managedFields") or []
            if "f:replicas" in ((e.get("fieldsV1") or {}).get("f:spec") or {})}


def wait_ready(kubectl, ns: str, name: str, operator: Operator) -> None:
    try:
        wait_for(f"LLMService {ns}/{name} to be Ready",
                 lambda: (llms(kubectl, ns, name).get("status") or {}).get("phase") == "Ready", timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{operator.log_tail()}") from None


def patch_and_wait_reconciled(kubectl, ns: str, name: str, spec: dict, operator: Operator) -> None:
    """Patch the spec and wait until the operator has reconciled that generation (status.observedGeneration)."""
    kubectl("patch", "llmservice", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}), check=True)
    generation = llms(kubectl, ns, name)["metadata"]["generation"]
    try:
        wait_for(f"generation {generation} reconciled",
                 lambda: (llms(kubectl, ns, name).get("status") or {}).get("observedGeneration") == generation,
                 timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{operator.log_tail()}") from None
    time.sleep(1.0)  # the reconciles that child events (the re-applied Deployments) trigger in turn


def unrelated_edit(i: int) -> dict:
    """Spec edits unrelated to decode's replicas: one only the router reads (the router rolls) and engine
    arguments (the workers roll: the operator re-applies the decode Deployment, without replicas)."""
    if i % 2 == 0:
        return {"router": {"prefillFailure": {"retries": 2 + i}}}
    return {"engine": {"args": ["--max-num-seqs", str(8 + i)]}}


def test_external_mode_leaves_a_kubectl_scale_alone_across_reconciles(operator, kubectl, namespace):
    name = apply(kubectl, namespace, {"replicas": 1, "autoscaling": {"mode": "external"}})
    wait_ready(kubectl, namespace, name, operator)
    kubectl("scale", f"deployment/{name}-decode", "--replicas", "3", "-n", namespace, check=True)
    for i in range(RECONCILES):
        patch_and_wait_reconciled(kubectl, namespace, name, unrelated_edit(i), operator)
        dep = decode_deployment(kubectl, namespace, name)
        assert dep["spec"]["replicas"] == 3, (i, replicas_owners(dep), operator.log_tail())
    # the spec's replicas is only the starting size in mode external
    patch_and_wait_reconciled(kubectl, namespace, name, {"decode": {"replicas": 5}}, operator)
    dep = decode_deployment(kubectl, namespace, name)
    assert dep["spec"]["replicas"] == 3
    assert "baton-operator" not in replicas_owners(dep) and "baton-autoscaler" not in replicas_owners(dep)
    wait_for("status to follow the outside autoscaler's 3 decode replicas",
             lambda: (llms(kubectl, namespace, name).get("status") or {}).get("decode", {}).get("desiredReplicas")
             == 3, timeout=30)


def test_switching_a_role_from_off_to_external_keeps_its_replicas(operator, kubectl, namespace):
    name = apply(kubectl, namespace, {"replicas": 2})
    wait_ready(kubectl, namespace, name, operator)
    assert replicas_owners(decode_deployment(kubectl, namespace, name)) == {"baton-operator"}
    patch_and_wait_reconciled(kubectl, namespace, name, {"decode": {"autoscaling": {"mode": "external"}}}, operator)
    assert "baton-handover" in replicas_owners(decode_deployment(kubectl, namespace, name))
    # baton-operator now applies the decode Deployment without replicas: released, not reset to 1
    patch_and_wait_reconciled(kubectl, namespace, name, unrelated_edit(1), operator)
    dep = decode_deployment(kubectl, namespace, name)
    assert dep["spec"]["replicas"] == 2 and "baton-operator" not in replicas_owners(dep), replicas_owners(dep)
    kubectl("scale", f"deployment/{name}-decode", "--replicas", "3", "-n", namespace, check=True)
    for i in range(2, 2 + RECONCILES):
        patch_and_wait_reconciled(kubectl, namespace, name, unrelated_edit(i), operator)
        assert decode_deployment(kubectl, namespace, name)["spec"]["replicas"] == 3, i


def test_the_hpa_controller_drives_an_external_role_through_its_scale_subresource(operator, kubectl, namespace):
    """A real HorizontalPodAutoscaler (kube-controller-manager's HPA controller) owns decode in mode external.
    The local cluster serves no metrics API, so the HPA cannot compute a utilization; but it reads and writes the
    role Deployment's /scale subresource before it asks for metrics -- a Deployment below `minReplicas` is raised
    to it ("Current number of replicas below Spec.MinReplicas") -- and that is the path every HPA and KEDA
    scaling takes. The operator must leave the HPA's replicas alone across reconciles."""
    name = apply(kubectl, namespace, {"replicas": 1, "autoscaling": {"mode": "external"}})
    wait_ready(kubectl, namespace, name, operator)
    hpa = {"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": f"{name}-decode", "namespace": namespace},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-decode"},
                    "minReplicas": 3, "maxReplicas": 4, "targetCPUUtilizationPercentage": 80}}
    kubectl("apply", "-f", "-", input=json.dumps(hpa), check=True)
    wait_for("the HPA controller to raise decode to its minReplicas (3)",
             lambda: decode_deployment(kubectl, namespace, name)["spec"]["replicas"] == 3, timeout=120)
    status = get_json(kubectl, "hpa", f"{name}-decode", "-n", namespace)["status"]
    assert status.get("desiredReplicas") == 3 and status.get("currentReplicas") in (1, 3), status
    # (Kubernetes 1.20 records no managedFields entry for a write through /scale, so who owns `replicas` says
    # nothing about the HPA here; that the operator's reconciles leave the HPA's value is what counts.)
    for i in range(RECONCILES):
        patch_and_wait_reconciled(kubectl, namespace, name, unrelated_edit(i), operator)
        assert decode_deployment(kubectl, namespace, name)["spec"]["replicas"] == 3, (i, operator.log_tail())
    owners = replicas_owners(decode_deployment(kubectl, namespace, name))
    assert not owners & {"baton-operator", "baton-autoscaler"}, owners
    print(f"HPA {namespace}/{name}-decode: decode 1 -> 3 through /scale, kept across {RECONCILES} reconciles "
          f"(replicas' field managers: {sorted(owners)})")
