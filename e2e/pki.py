"""Certificates for the local control plane, made with the ``openssl`` command line tool.

CA; kube-apiserver serving certificate with the SANs clients use (127.0.0.1, localhost, the first
service IP 10.0.0.1, kubernetes.default.svc...); an admin client certificate in ``system:masters``;
the service-account RSA key pair; a static token file with an admin token.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import subprocess
from pathlib import Path

SERVER_SANS = (
    "IP:127.0.0.1",
    "IP:10.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclasses.dataclass(frozen=True)
class Pki:
    dir: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    token_file: Path
    admin_token: str
    #: the apiserver's client certificate towards kubelets (logs, exec, port-forward on real nodes)
    kubelet_client_crt: Path | None = None
    kubelet_client_key: Path | None = None


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr[-1500:]}")


CLIENT_EXT = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


def issue_leaf(directory: Path, name: str, subj: str, ext: str = CLIENT_EXT, days: int = 30) -> tuple[Path, Path]:
    """A key + certificate ``NAME.key``/``NAME.crt`` in ``directory`` signed by its ``ca.crt``/``ca.key``.

    ``subj`` is an openssl subject such as ``/O=system:nodes/CN=system:node:real-0`` (the Node authorizer
    reads both); ``ext`` the X.509 extensions (default: a client certificate)."""
    d = Path(directory)
    o = lambda *a: _openssl(*a, cwd=d)
    (d / f"{name}.ext").write_text(ext)
    o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
    o(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext",
    )
    for suffix in ("key", "crt", "csr", "ext"):
        (d / f"{name}.{suffix}").chmod(0o600)
    return d / f"{name}.crt", d / f"{name}.key"


def make_pki(directory: Path, days: int = 30, extra_sans: tuple[str, ...] = ()) -> Pki:
    """``extra_sans`` (e.g. ``("IP:192.0.2.2",)``): more names for the apiserver's serving certificate, for
    clients that reach it by the host's address (pods on real nodes, through the ``kubernetes`` Service)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make the test cluster's certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    o = lambda *a: _openssl(*a, cwd=d)
    o(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        str(days),
        "-subj",
        "/CN=baton-local-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )

    def leaf(name: str, subj: str, ext: str) -> None:
        issue_leaf(d, name, subj, ext, days)

    leaf(
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join((*SERVER_SANS, *extra_sans))}\n",
    )
    leaf("admin", "/O=system:masters/CN=baton-admin", CLIENT_EXT)
    leaf("kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", CLIENT_EXT)
    o("genrsa", "-out", "sa.key", "2048")
    o("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    token = secrets.token_hex(16)
    (d / "tokens.csv").write_text(f'{token},baton-admin,baton-admin,"system:masters"\n')
    for p in d.iterdir():
        p.chmod(0o600)
    return Pki(
        dir=d,
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        server_crt=d / "apiserver.crt",
        server_key=d / "apiserver.key",
        admin_crt=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
        token_file=d / "tokens.csv",
        admin_token=token,
        kubelet_client_crt=d / "kubelet-client.crt",
        kubelet_client_key=d / "kubelet-client.key",
    )


def self_signed_cert(directory: Path, ip: str) -> tuple[Path, Path]:
    """``cert.pem``/``key.pem`` in ``directory``: a server certificate for ``ip`` that is its own CA (so
    cert.pem doubles as the CA file a client trusts), made with the ``cryptography`` package; for test servers."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baton-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
