"""The generated CRD against a real Kubernetes 1.20 API server (no operator, no webhook).

Proves what unit tests can only approximate: the API server accepts the schema as structural, applies its
defaults, keeps int-or-string quantities and preserve-unknown-fields affinity, and its own validation refuses
what the schema can express (the webhook adds the rest).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crd_installed(llmservice_crd):
    crd = llmservice_crd
    problems = [c for c in crd["status"]["conditions"] if c["type"] == "NonStructuralSchema"]
    assert not problems, problems
    return crd


def _create(kubectl, namespace: str, body: dict, dry_run: bool = True):
    args = ["create", "-n", namespace, "-o", "json", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return kubectl(*args, input=yaml.safe_dump(body))


@pytest.mark.parametrize("example", ["llama-disagg.yaml", "tiny-local.yaml"])
def test_examples_are_accepted_and_defaulted(crd_installed, kubectl, namespace, example):
    body = yaml.safe_load((REPO / "examples" / example).read_text())
    body["metadata"].pop("namespace", None)
    out = _create(kubectl, namespace, body)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["spec"]
    assert spec["kvTransfer"]["port"] == 14579
    assert spec["router"]["port"] == 8080
    assert spec["prefill"]["autoscaling"]["maxReplicas"] >= 1
    if example == "tiny-local.yaml":
        assert spec["slo"]["attainment"] == 0.9
        assert "image" not in spec["engine"]  # no CRD default: the operator's worker image (--worker-image)
        assert spec["autoscaling"] == {"enabled": False, "interval": "15s", "scaleUpStabilization": "0s",
                                       "scaleDownStabilization": "300s"}
    else:
        assert spec["prefill"]["resources"]["limits"]["nvidia.com/gpu"] == 2  # int-or-string kept as given


def test_minimal_object_round_trips_through_the_parser(crd_installed, kubectl, namespace):
    from baton.operator.api import parse_llmservice

    body = {"apiVersion": "baton.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "mini"},
            "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}},
                     "decode": {"affinity": {"podAntiAffinity": {"anything": ["goes"]}}}}}
    out = _create(kubectl, namespace, body, dry_run=False)
    assert out.returncode == 0, out.stderr
    stored = json.loads(kubectl("get", "llms", "mini", "-n", namespace, "-o", "json", check=True).stdout)
    assert stored["spec"]["decode"]["affinity"] == {"podAntiAffinity": {"anything": ["goes"]}}
    svc = parse_llmservice(stored)  # what the API server stores, defaults included, parses cleanly
    assert svc.spec.slo.ttft.seconds == 0.5
    table = kubectl("get", "llmsvc", "-n", namespace, check=True).stdout
    assert table.split()[:8] == ["NAME", "READY", "PREFILL", "DECODE", "TTFT-P90", "TPOT-P90", "SLO", "AGE"]
    assert "mini" in kubectl("get", "baton", "-n", namespace, check=True).stdout  # category


@pytest.mark.parametrize(("change", "fragment"), [
    ({"prefill": {"replicas": -1}}, "spec.prefill.replicas"),
    ({"kvTransfer": {"locality": "rack"}}, "spec.kvTransfer.locality"),
    ({"slo": {"ttft": "500"}}, "spec.slo.ttft"),
    ({"decode": {"resources": {"limits": {"memory": "8GB"}}}}, "spec.decode.resources.limits.memory"),
])
def test_schema_alone_refuses(crd_installed, kubectl, namespace, change, fragment):
    body = {"apiVersion": "baton.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "bad"},
            "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}}}}
    body = copy.deepcopy(body)
    body["spec"].update(change)
    out = _create(kubectl, namespace, body)
    assert out.returncode != 0 and fragment in out.stderr, out.stderr
