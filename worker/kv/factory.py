"""Build the KV transport a worker asked for (`baton worker --kv-transport ...`)."""
from __future__ import annotations

import logging

from .base import KVTransport

log = logging.getLogger("baton.worker.kv")

KINDS = ("auto", "tcp", "nixl", "inprocess")


def make_transport(kind: str, *, role: str, host: str | None = None, port: int = 14579,
                   secret=None) -> KVTransport:
    """`auto`: NIXL when it is installed and an agent starts here, else TCP. `secret` None: env
    BATON_KV_SECRET. Raises ValueError (unknown kind) or KVTransferFailed (NIXLUnavailable for `nixl`,
    port busy...)."""
    if kind not in KINDS:
        raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(KINDS)}")
    serve = role != "decode"
    kw = {} if secret is None else {"secret": secret}
    if kind == "inprocess":
        from .inprocess import InProcessKVTransport

        return InProcessKVTransport()
    if kind in ("auto", "nixl"):
        from . import nixl

        if kind == "nixl":
            nixl.check_available()  # NIXLUnavailable with the reason
            return nixl.NIXLKVTransport(host, port, serve=serve, **kw)
        reason = nixl.unavailable_reason()
        if reason is None:
            return nixl.NIXLKVTransport(host, port, serve=serve, **kw)
        log.info("KV transport auto: NIXL not usable (%s); using TCP", reason)
    from .tcp import TCPKVTransport

    return TCPKVTransport(host, port, serve=serve, **kw)
