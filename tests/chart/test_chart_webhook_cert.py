"""The webhook certificate's two modes, rendered offline: the chart's self-signed Secret (default) or a
cert-manager Certificate whose CA cert-manager's injector puts into the webhook configuration."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from .conftest import CHART

CERT_MANAGER = "cert-manager.io/v1"
INJECT = "cert-manager.io/inject-ca-from"


def of(docs: list[dict], kind: str, api: str | None = None) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind and (api is None or d["apiVersion"] == api)}


def mounted_secret(docs: list[dict]) -> str:
    (dep,) = of(docs, "Deployment").values()
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    mount = {m["name"]: m for m in c["volumeMounts"]}["webhook-tls"]
    assert mount["mountPath"] == "/etc/baton/webhook" and "subPath" not in mount  # a subPath is never updated
    assert "--webhook-cert=/etc/baton/webhook/tls.crt" in c["args"]
    assert "--webhook-key=/etc/baton/webhook/tls.key" in c["args"]
    return {v["name"]: v for v in pod["volumes"]}["webhook-tls"]["secret"]["secretName"]


def webhook_configuration(docs: list[dict]) -> dict:
    (config,) = of(docs, "ValidatingWebhookConfiguration").values()
    return config


def test_default_is_the_charts_self_signed_certificate(render):
    docs = render(namespace="ops", release="r1")
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    secret = of(docs, "Secret")["r1-baton-webhook-tls"]
    assert mounted_secret(docs) == "r1-baton-webhook-tls"
    config = webhook_configuration(docs)
    assert INJECT not in (config["metadata"].get("annotations") or {})
    assert config["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["tls.crt"]


def test_cert_manager_with_a_bootstrapped_ca(render):
    docs = render("--set", "webhook.certManager.enabled=true", "--set", "webhook.certificate.extraIPs={127.0.0.1}",
                  "--set", "webhook.certificate.extraDNSNames={hooks.example}", namespace="ops", release="r1")
    assert not of(docs, "Secret"), "cert-manager writes the Secret, not the chart"
    certs, issuers = of(docs, "Certificate", CERT_MANAGER), of(docs, "Issuer", CERT_MANAGER)
    assert set(certs) == {"r1-baton-webhook", "r1-baton-webhook-ca"}
    assert set(issuers) == {"r1-baton-selfsigned", "r1-baton-webhook-ca"}
    assert all(d["metadata"]["namespace"] == "ops" for d in [*certs.values(), *issuers.values()])
    # self-signed Issuer -> CA Certificate -> CA Issuer -> the webhook's Certificate
    assert issuers["r1-baton-selfsigned"]["spec"] == {"selfSigned": {}}
    ca = certs["r1-baton-webhook-ca"]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == "r1-baton-selfsigned"
    assert ca["duration"] == f"{3650 * 24}h"
    assert issuers["r1-baton-webhook-ca"]["spec"] == {"ca": {"secretName": ca["secretName"]}}
    leaf = certs["r1-baton-webhook"]["spec"]
    assert leaf["issuerRef"] == {"name": "r1-baton-webhook-ca", "kind": "Issuer", "group": "cert-manager.io"}
    # The Secret the Certificate writes is the one the operator mounts (and re-reads when it is renewed).
    assert leaf["secretName"] == mounted_secret(docs) == "r1-baton-webhook-tls"
    assert "r1-baton-webhook.ops.svc" in leaf["dnsNames"] and "hooks.example" in leaf["dnsNames"]
    assert leaf["ipAddresses"] == ["127.0.0.1"]
    assert "server auth" in leaf["usages"] and leaf["privateKey"]["rotationPolicy"] == "Always"
    assert "duration" not in leaf and "renewBefore" not in leaf  # cert-manager's defaults
    config = webhook_configuration(docs)
    assert config["metadata"]["annotations"][INJECT] == "ops/r1-baton-webhook"
    (hook,) = config["webhooks"]
    assert "caBundle" not in hook["clientConfig"], "the CA injector owns the caBundle"
    assert hook["clientConfig"]["service"]["name"] == "r1-baton-webhook"


def test_cert_manager_with_your_issuer(render):
    docs = render("--set", "webhook.certManager.enabled=true",
                  "--set", "webhook.certManager.issuerRef.name=corp-ca,webhook.certManager.issuerRef.kind=ClusterIssuer",
                  "--set", "webhook.certManager.duration=2160h,webhook.certManager.renewBefore=720h")
    assert not of(docs, "Issuer") and not of(docs, "Secret")
    (name, cert), = of(docs, "Certificate", CERT_MANAGER).items()
    spec = cert["spec"]
    assert spec["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert (spec["duration"], spec["renewBefore"]) == ("2160h", "720h")
    assert spec["secretName"] == mounted_secret(docs)
    assert webhook_configuration(docs)["metadata"]["annotations"][INJECT] == f"baton-system/{name}"


def test_cert_manager_excludes_an_existing_secret(helm_bin):
    out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", "webhook.certManager.enabled=true",
                          "--set", "webhook.certificate.existingSecret=mine,webhook.certificate.caBundle=Q0E="],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode != 0 and "existingSecret" in out.stderr and "certManager" in out.stderr, out.stderr


def test_cert_manager_disabled_by_webhook(render):
    docs = render("--set", "webhook.enabled=false,webhook.certManager.enabled=true")
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]


def test_values_default_to_self_signed():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["webhook"]["certManager"]["enabled"] is False


def test_lint_with_cert_manager(helm_bin):
    out = subprocess.run([helm_bin, "lint", "--strict", str(CHART), "--set", "webhook.certManager.enabled=true"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("bad", [
    "webhook.certManager.duration=90days", "webhook.certManager.renewBefore=soon", "webhook.certManager.nosuch=1",
    "webhook.certManager.issuerRef.kind=", "webhook.certManager.issuerRef.namespace=x",
])
def test_schema_refuses_bad_cert_manager_values(helm_bin, bad):
    out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", bad],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, (
        bad, out.stderr)
