"""The webhook server's certificate follows its files: a rotated Secret applies without restarting the operator.

In a cluster the certificate is a mounted Secret (the Helm chart's self-signed one, cert-manager's, or your
own). The kubelet updates such a volume in place when the Secret changes: it writes the new keys into a new
folder and swaps the `..data` symlink (atomically), within about a minute. kopf's own WebhookServer would
notice a change only by tearing its listener down and binding it again (a moment in which the apiserver's calls
fail; `failurePolicy: Fail` refuses LLMService writes then), and a pair it cannot load there ends the server.

`ReloadingWebhookServer` keeps kopf's server (routes, request handling, client config) and its listening
socket, and only changes which certificate new TLS handshakes get: the listening SSLContext's SNI callback
(called for every ClientHello, with or without a server name) hands each connection the context of the newest
pair that loaded. A small task polls the files (a content hash every `reload_interval` seconds: a mounted
Secret sends no file events, and watching it through the API would need Secret read RBAC, which the operator
refuses on purpose). A pair that does not load -- a key that does not match the certificate, a half-written
or missing file -- is logged as a warning naming the files and skipped: the previous certificate stays in use
and the pair is tried again when the files change. Connections already open keep the certificate they began
with.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import kopf

logger = logging.getLogger(__name__)

#: Seconds between two looks at the certificate files (two small reads and a hash).
DEFAULT_RELOAD_INTERVAL = 5.0


class ReloadingWebhookServer(kopf.WebhookServer):
    """kopf's WebhookServer whose certificate is re-read from `certfile`/`pkeyfile` when they change."""

    def __init__(self, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL, **kwargs: Any) -> None:
        if kwargs.get("context") is not None or kwargs.get("insecure"):
            raise ValueError("ReloadingWebhookServer builds its own SSL context from certfile/pkeyfile")
        # The listening context: kopf loads the first pair into it; its SNI callback switches every new
        # handshake to the newest pair that loaded.
        front = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        front.sni_callback = self._select_context
        super().__init__(context=front, **kwargs)
        self.reload_interval = reload_interval
        self._active: ssl.SSLContext | None = None  # the context of the newest pair that loaded
        self._digest: str | None = None  # the hash of the files it was loaded from
        self._cert_pem: bytes | None = None  # and their certificate (public)
        self._rejected: str | None = None  # the hash of files that did not load (tried again once they change)
        self._problem: str | None = None  # the last warning, so that a lasting problem is logged once

    # -- serving -----------------------------------------------------------------------------------------

    def _select_context(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                        context: ssl.SSLContext) -> None:
        active = self._active
        if active is not None and sslobj.context is not active:
            sslobj.context = active

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        if self.certfile is None or self.pkeyfile is None:  # kopf generates a certificate: nothing to follow
            async for client_config in super().__call__(fn):
                yield client_config
            return
        self.reload()  # what the listener starts with (kopf loads the same files into the front context)
        # kopf's generator serves from its first yield until it is closed; it is never resumed, so its own
        # restart-on-change (a new listener) never runs.
        configs = super().__call__(fn)
        try:
            client_config = await configs.__anext__()
            yield client_config
            while True:
                await asyncio.sleep(self.reload_interval)
                if self.reload() and self.cadata is None and self.cafile is None:
                    # kopf trusts the served certificate itself (a self-signed one) as the webhook's caBundle:
                    # in kopf's managed mode it patches the configuration with this one.
                    assert self._cert_pem is not None
                    client_config = dict(client_config,
                                         caBundle=base64.b64encode(self._cert_pem).decode("ascii"))
                    yield client_config
        finally:
            await configs.aclose()  # kopf's own clean-up: stop listening

    # -- the files ---------------------------------------------------------------------------------------

    def _read(self) -> tuple[bytes, bytes]:
        assert self.certfile is not None and self.pkeyfile is not None
        with open(self.certfile, "rb") as cert, open(self.pkeyfile, "rb") as key:
            return cert.read(), key.read()

    def _files_digest(self) -> tuple[str, bytes]:
        """A hash of both files (only a hash of the key stays in memory, as in kopf) and the certificate."""
        cert, key = self._read()
        return hashlib.sha256(hashlib.sha256(cert).digest() + hashlib.sha256(key).digest()).hexdigest(), cert

    def _new_context(self) -> ssl.SSLContext:
        """A server context like kopf's (`_build_ssl`), with the files' current pair."""
        context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        if self.verify_mode is not None:
            context.verify_mode = self.verify_mode
        if self.verify_cafile or self.verify_capath or self.verify_cadata:
            context.load_verify_locations(self.verify_cafile, self.verify_capath, self.verify_cadata)
            if context.verify_mode == ssl.CERT_NONE:
                context.verify_mode = ssl.CERT_OPTIONAL
        assert self.certfile is not None and self.pkeyfile is not None
        context.load_cert_chain(self.certfile, self.pkeyfile, self.password)
        return context

    def _warn(self, problem: str) -> None:
        if problem != self._problem:
            self._problem = problem
            keeping = ("keeping the certificate loaded before" if self._active is not None
                       else "no certificate loaded yet")
            logger.warning(f"webhook certificate {self.certfile} / key {self.pkeyfile}: {problem}; {keeping}, "
                           f"trying again when the files change")

    def reload(self) -> bool:
        """Load the files' pair if it changed since the last look; True when new handshakes now get it.

        Never raises for a pair that does not load: it is logged once and skipped until the files change.
        """
        try:
            digest, cert_pem = self._files_digest()
        except OSError as exc:
            self._warn(f"cannot be read ({exc.strerror or exc}: {exc.filename or ''})")
            return False
        if digest in (self._digest, self._rejected):
            return False
        try:
            context = self._new_context()
        except (ssl.SSLError, OSError, ValueError) as exc:
            error: Exception | None = exc
        else:
            error = None
        try:
            settled = self._files_digest()[0] == digest  # not swapped again while they were loaded
        except OSError:
            settled = False
        if not settled:
            return False  # changing right now: look again next time
        if error is not None:
            self._rejected, self._problem = digest, None  # new files: worth a warning even if the error repeats
            self._warn(f"the pair does not load ({error})")
            return False
        self._active, self._digest, self._cert_pem = context, digest, cert_pem
        self._rejected = self._problem = None
        logger.info(f"webhook certificate loaded from {self.certfile}: {_describe(cert_pem)}")
        return True


def _describe(cert_pem: bytes) -> str:
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_pem)
    except Exception:  # noqa: BLE001 -- only for the log line; ssl loaded it already
        return "(not parsed)"
    return f"serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
