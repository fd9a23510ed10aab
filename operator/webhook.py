"""The validating admission webhook's server settings and its TLS certificate.

Kubernetes 1.20 has no CEL validation rules, so the rules a schema cannot express (min <= max, powers of
two, cross-field requirements) are enforced by kopf's webhook. The apiserver only calls webhooks over TLS:
unless a certificate is given (in-cluster, from the Helm chart), a self-signed one is generated here for the
host the apiserver will call, and kopf publishes it as the caBundle of its ValidatingWebhookConfiguration.
The server re-reads a given certificate when its files change (a rotated Secret, mounted): see webhook_tls.py.
"""
from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import kopf
from baton.operator.webhook_tls import DEFAULT_RELOAD_INTERVAL, ReloadingWebhookServer

if TYPE_CHECKING:
    from baton.operator.kube import Kube

#: The ValidatingWebhookConfiguration kopf creates and keeps up to date.
WEBHOOK_CONFIGURATION = "baton.dev"


@dataclass
class WebhookOptions:
    enabled: bool = True
    listen: str = "0.0.0.0"
    port: int = 9443
    host: str = "127.0.0.1"  # how the apiserver reaches us (a Service DNS name in a cluster)
    certfile: str | None = None
    keyfile: str | None = None
    # Whether kopf creates and patches the ValidatingWebhookConfiguration itself. The Helm chart sets
    # BATON_WEBHOOK_MANAGED=0 and ships the configuration (a Service reference + its certificate as caBundle):
    # kopf's managed mode also creates a MutatingWebhookConfiguration, and `create` on those cannot be limited
    # to one name in RBAC -- an operator allowed to create mutating webhooks could intercept every pod.
    managed: bool = True
    # Seconds between two looks at certfile/keyfile: a changed pair is served from the next handshake on.
    cert_reload_interval: float = DEFAULT_RELOAD_INTERVAL


#: Set by `baton operator run` before kopf starts; read by the startup handler.
OPTIONS = WebhookOptions(enabled=os.environ.get("BATON_WEBHOOK", "1") != "0",
                         managed=os.environ.get("BATON_WEBHOOK_MANAGED", "1") != "0")


def self_signed_certificate(host: str, directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate valid for `host` (DNS name or IP) and return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "webhook.crt", directory / "webhook.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def remove_managed_configuration(kube: Kube, options: WebhookOptions | None = None) -> bool:
    """On a clean exit, delete the webhook configurations kopf created for this operator.

    They point at this process with `failurePolicy: Fail`: left behind, every later create or update of an
    LLMService would be refused until an operator runs again. Only in kopf's managed mode (local runs); the
    Helm chart owns its configuration. Returns whether anything was deleted.
    """
    options = options or OPTIONS
    if not (options.enabled and options.managed):
        return False
    deleted = False
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        deleted |= kube.delete("admissionregistration.k8s.io/v1", kind, None, WEBHOOK_CONFIGURATION)
    return deleted


def configure_admission(settings: kopf.OperatorSettings, options: WebhookOptions | None = None) -> None:
    options = options or OPTIONS
    if not options.enabled:
        return
    certfile, keyfile = options.certfile, options.keyfile
    if not (certfile and keyfile):
        # a throwaway key for this process only: removed when it exits (a local run left one per start behind)
        folder = Path(tempfile.mkdtemp(prefix="baton-webhook-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        certfile, keyfile = map(str, self_signed_certificate(options.host, folder))
    settings.admission.server = ReloadingWebhookServer(addr=options.listen, port=options.port, host=options.host,
                                                       certfile=certfile, pkeyfile=keyfile,
                                                       reload_interval=options.cert_reload_interval)
    if options.managed:
        settings.admission.managed = WEBHOOK_CONFIGURATION
