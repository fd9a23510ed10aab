"""The webhook server follows its certificate files without a restart, over REAL TLS on localhost.

The files are written the way the kubelet updates a mounted Secret: the keys in a new folder, then an atomic
swap of the `..data` symlink that `tls.crt` and `tls.key` point through.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import ssl
import time
from pathlib import Path

import aiohttp
import kopf
import pytest
from baton.operator.webhook import WebhookOptions, configure_admission, self_signed_certificate
from baton.operator.webhook_tls import ReloadingWebhookServer
from baton.worker.local_fleet import free_port
from cryptography import x509

INTERVAL = 0.05  # the tests' reload interval (seconds)


def write_like_kubelet(directory: Path, files: dict[str, bytes]) -> None:
    """What the kubelet's AtomicWriter does for a Secret volume: a new timestamped folder with the keys, a
    `..data` symlink swapped to it with rename(2), each key a symlink through `..data`, the old folder removed."""
    directory.mkdir(parents=True, exist_ok=True)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for name, data in files.items():
        (stamp / name).write_bytes(data)
    (directory / "..data_tmp").symlink_to(stamp.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if old:
        shutil.rmtree(directory / old)


def new_pair(tmp: Path, name: str) -> tuple[bytes, bytes]:
    cert, key = self_signed_certificate("127.0.0.1", tmp / name)
    return cert.read_bytes(), key.read_bytes()


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def served_serial(port: int, server_hostname: str | None = None) -> int:
    """The serial number of the certificate a new TLS handshake gets (not verified: any certificate will do)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


async def until(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(INTERVAL)


async def review(port: int, cadata: bytes) -> dict:
    """An admission review posted over a connection that trusts only `cadata` (proves the served key too)."""
    context = ssl.create_default_context(cadata=cadata.decode())
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u1"}}
    async with (aiohttp.ClientSession() as session,
                session.post(f"https://127.0.0.1:{port}/validate", json=body, ssl=context) as response):
        assert response.status == 200
        return await response.json()


async def answer(request: dict, **_) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": request["request"]["uid"], "allowed": True}}


@pytest.fixture
async def serving(tmp_path):
    """start(cert, key) -> (port, client configs): the server on its files in tmp_path/secret (kubelet-style)."""
    started: list[tuple[ReloadingWebhookServer, asyncio.Task]] = []

    async def start(cert: bytes, key: bytes) -> tuple[int, list[dict]]:
        secret = tmp_path / "secret"
        write_like_kubelet(secret, {"tls.crt": cert, "tls.key": key})
        port = free_port()
        server = ReloadingWebhookServer(addr="127.0.0.1", port=port, host="127.0.0.1",
                                        certfile=str(secret / "tls.crt"), pkeyfile=str(secret / "tls.key"),
                                        reload_interval=INTERVAL)
        await server.__aenter__()
        configs: list[dict] = []

        async def consume() -> None:
            async for config in server(answer):
                configs.append(config)

        task = asyncio.create_task(consume())
        started.append((server, task))
        await until("the first client config", lambda: asyncio.sleep(0, bool(configs)))
        return port, configs

    yield start
    for server, task in started:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.__aexit__(None, None, None)


async def test_a_rotated_secret_is_served_without_a_restart(serving, tmp_path):
    (cert_a, key_a), (cert_b, key_b) = new_pair(tmp_path, "a"), new_pair(tmp_path, "b")
    port, configs = await serving(cert_a, key_a)
    assert await served_serial(port) == serial(cert_a)
    assert (await review(port, cert_a))["response"]["allowed"] is True

    # A connection opened before the rotation: kept by the same listener (kopf's own reload would restart it).
    context = ssl.create_default_context(cadata=cert_a.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")

    write_like_kubelet(tmp_path / "secret", {"tls.crt": cert_b, "tls.key": key_b})
    await until("the new certificate to be served", lambda: _serves(port, serial(cert_b)))
    assert await served_serial(port, server_hostname="localhost") == serial(cert_b)  # with SNI too
    assert (await review(port, cert_b))["response"]["allowed"] is True  # the new key signs the handshake
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await review(port, cert_a)

    body = json.dumps({"request": {"uid": "old"}}).encode()
    writer.write(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()

    # kopf trusts a served self-signed certificate as the caBundle (its managed mode patches the configuration)
    assert configs[0]["caBundle"] == base64.b64encode(cert_a).decode()
    assert configs[-1]["caBundle"] == base64.b64encode(cert_b).decode()
    assert configs[-1]["url"] == configs[0]["url"]


async def _serves(port: int, wanted: int) -> bool:
    return await served_serial(port) == wanted


async def test_a_pair_that_does_not_load_keeps_the_previous_certificate(serving, tmp_path, caplog):
    (cert_a, key_a), (cert_b, key_b) = new_pair(tmp_path, "a"), new_pair(tmp_path, "b")
    cert_c, key_c = new_pair(tmp_path, "c")
    port, configs = await serving(cert_a, key_a)
    secret = tmp_path / "secret"
    write_like_kubelet(secret, {"tls.crt": cert_b, "tls.key": key_b})
    await until("B to be served", lambda: _serves(port, serial(cert_b)))
    caplog.set_level(logging.WARNING, logger="baton.operator.webhook_tls")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    bad = {
        "mismatched": {"tls.crt": cert_c, "tls.key": key_b},  # C's certificate with B's key
        "half-written": {"tls.crt": cert_c[: len(cert_c) // 2], "tls.key": key_c},
        "empty key": {"tls.crt": cert_c, "tls.key": b""},
    }
    for case, files in bad.items():
        caplog.clear()
        write_like_kubelet(secret, files)
        await until(f"a warning about the {case} pair", lambda: asyncio.sleep(0, bool(warnings())))
        await asyncio.sleep(10 * INTERVAL)  # several more looks at the same files
        (message,) = warnings()  # once, not once per look
        assert str(secret / "tls.crt") in message and str(secret / "tls.key") in message, message
        assert "keeping the certificate loaded before" in message
        assert await served_serial(port) == serial(cert_b), case
        assert (await review(port, cert_b))["response"]["allowed"] is True, case

    # The files vanish (the folder the symlinks point into is gone): still B.
    caplog.clear()
    os.unlink(secret / "..data")
    await until("a warning about unreadable files", lambda: asyncio.sleep(0, bool(warnings())))
    assert "cannot be read" in warnings()[0] and str(secret / "tls.crt") in warnings()[0]
    assert await served_serial(port) == serial(cert_b)

    # A good pair again: tried as soon as the files change, served.
    write_like_kubelet(secret, {"tls.crt": cert_c, "tls.key": key_c})
    await until("C to be served", lambda: _serves(port, serial(cert_c)))
    assert (await review(port, cert_c))["response"]["allowed"] is True
    assert [c["caBundle"] for c in configs] == [base64.b64encode(c).decode() for c in (cert_a, cert_b, cert_c)]


async def test_a_reverted_pair_is_served_again(serving, tmp_path):
    """Back to a pair served before (a rollback of the Secret) after a pair that did not load."""
    (cert_a, key_a), (cert_b, key_b) = new_pair(tmp_path, "a"), new_pair(tmp_path, "b")
    port, _ = await serving(cert_a, key_a)
    secret = tmp_path / "secret"
    write_like_kubelet(secret, {"tls.crt": cert_b, "tls.key": key_a})
    await asyncio.sleep(5 * INTERVAL)
    assert await served_serial(port) == serial(cert_a)
    write_like_kubelet(secret, {"tls.crt": cert_b, "tls.key": key_b})
    await until("B to be served", lambda: _serves(port, serial(cert_b)))
    write_like_kubelet(secret, {"tls.crt": cert_a, "tls.key": key_a})
    await until("A to be served again", lambda: _serves(port, serial(cert_a)))


def test_reload_loads_only_changed_pairs(tmp_path):
    (cert_a, key_a), (cert_b, key_b) = new_pair(tmp_path, "a"), new_pair(tmp_path, "b")
    secret = tmp_path / "secret"
    write_like_kubelet(secret, {"tls.crt": cert_a, "tls.key": key_a})
    server = ReloadingWebhookServer(certfile=str(secret / "tls.crt"), pkeyfile=str(secret / "tls.key"))
    assert server.reload() is True
    assert server.reload() is False  # same files
    write_like_kubelet(secret, {"tls.crt": cert_b, "tls.key": key_a})
    assert server.reload() is False  # does not load
    write_like_kubelet(secret, {"tls.crt": cert_b, "tls.key": key_b})
    assert server.reload() is True


def test_the_operator_serves_with_the_reloading_server(tmp_path):
    cert, key = self_signed_certificate("127.0.0.1", tmp_path)
    settings = kopf.OperatorSettings()
    configure_admission(settings, WebhookOptions(certfile=str(cert), keyfile=str(key), managed=False,
                                                 cert_reload_interval=2.5))
    server = settings.admission.server
    assert isinstance(server, ReloadingWebhookServer)
    assert (server.certfile, server.pkeyfile, server.reload_interval) == (str(cert), str(key), 2.5)
    settings = kopf.OperatorSettings()
    configure_admission(settings, WebhookOptions())  # a local run: its own self-signed files, followed as well
    assert isinstance(settings.admission.server, ReloadingWebhookServer)
    assert settings.admission.server.certfile
