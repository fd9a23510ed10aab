"""A rotated webhook certificate against a REAL kube-apiserver: the operator process (`baton operator run`, kopf's
managed mode) serves its certificate from kubelet-style files; replacing them changes what the apiserver is
served and trusts (the caBundle kopf registers) without a restart, and a pair that does not load changes
nothing."""
from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import pytest
import yaml
from baton.e2e.processes import OperatorProcess as Operator
from baton.e2e.processes import wait_for
from baton.operator.webhook import self_signed_certificate
from cryptography import x509

from tests.operator.test_webhook_reload import write_like_kubelet

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "operator" / "bad" / "min-greater-than-max.yaml"  # refused by the webhook alone


def pair(tmp: Path, name: str) -> dict[str, bytes]:
    cert, key = self_signed_certificate("127.0.0.1", tmp / name)
    return {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()}


def serial(pem: bytes | str) -> int:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem).serial_number


def registered_ca(kubectl) -> bytes | None:
    out = kubectl("get", "validatingwebhookconfiguration", "baton.dev", "-o", "json")
    if out.returncode != 0:
        return None
    return base64.b64decode(json.loads(out.stdout)["webhooks"][0]["clientConfig"].get("caBundle") or "")


def served_serial(port: int) -> int:
    return serial(ssl.get_server_certificate(("127.0.0.1", port), timeout=5))


def refused_by_the_webhook(kubectl, namespace: str) -> str:
    bad = yaml.safe_load(BAD.read_text())
    bad["metadata"]["namespace"] = namespace
    out = kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(bad))
    message = out.stdout + out.stderr
    assert out.returncode != 0, message
    assert "denied the request" in message and "must not exceed maxReplicas" in message, message
    assert "x509" not in message and "tls" not in message.lower(), message
    return message


def test_rotated_certificate_is_served_and_trusted_without_a_restart(local_cluster, kubeconfig, llmservice_crd,
                                                                     kubectl, namespace, tmp_path):
    secret = tmp_path / "secret"
    a, b, c = pair(tmp_path, "a"), pair(tmp_path, "b"), pair(tmp_path, "c")
    write_like_kubelet(secret, a)
    op = Operator(str(kubeconfig), tmp_path / "operator.log",
                  extra_args=("--webhook-cert", str(secret / "tls.crt"), "--webhook-key", str(secret / "tls.key")))
    op.start()
    try:
        wait_for("the operator to register its webhook with certificate A", lambda: registered_ca(kubectl) == a["tls.crt"],
                 timeout=90, diagnostics=op.log_tail)
        assert served_serial(op.webhook_port) == serial(a["tls.crt"])
        refused_by_the_webhook(kubectl, namespace)
        pid = op.proc.pid

        write_like_kubelet(secret, b)
        wait_for("certificate B to be served", lambda: served_serial(op.webhook_port) == serial(b["tls.crt"]),
                 timeout=60, diagnostics=op.log_tail)
        wait_for("certificate B to be registered as the caBundle", lambda: registered_ca(kubectl) == b["tls.crt"],
                 timeout=60, diagnostics=op.log_tail)
        wait_for("the apiserver to call the webhook over B", lambda: refused_by_the_webhook(kubectl, namespace),
                 timeout=30, diagnostics=op.log_tail)

        write_like_kubelet(secret, {"tls.crt": c["tls.crt"], "tls.key": b["tls.key"]})  # does not load
        wait_for("the operator to warn about the mismatched pair",
                 lambda: "the pair does not load" in op.log_path.read_text(), timeout=60, diagnostics=op.log_tail)
        assert str(secret / "tls.crt") in op.log_path.read_text()
        assert served_serial(op.webhook_port) == serial(b["tls.crt"])
        assert registered_ca(kubectl) == b["tls.crt"]
        refused_by_the_webhook(kubectl, namespace)
        assert op.proc.poll() is None and op.proc.pid == pid, op.log_tail()
    finally:
        op.stop()
