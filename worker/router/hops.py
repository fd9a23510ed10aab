"""One upstream hop of the router: POST to a worker and read its body under the router's hop timeouts, and the
errors a hop ends with.

Timeouts (a worker that accepts the connection but never answers must not hold a request forever): every hop
must return its response headers within `hop_timeout` seconds (time to first byte), and once they are in, no
more than `stream_idle_timeout` seconds may pass without a byte of the body (SSE or JSON). Either expiry
raises `HopTimeout`; the caller closes the upstream connection and counts a failed hop
(`baton_router_hop_errors_total{reason="timeout"}`). 0 (or None) disables a timeout.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from baton.worker.router.request import SSE_DONE

from baton.launch import ErrorCode

#: What a failed hop raises: the worker is unreachable, went away, or timed out.
UPSTREAM_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError)


class HopTimeout(asyncio.TimeoutError):
    """One of the router's own hop timeouts expired (a readable message instead of a bare TimeoutError)."""


class HopFailed(Exception):
    """A failed attempt at the last hop that may be retried (no byte reached the client)."""

    def __init__(self, reason: str, message: str, *, exclude: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exclude = exclude


def error_json(message: str, *, status: int, type: str, code: str | None = None,
               param: str | None = None, headers: dict | None = None) -> web.Response:
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/json", headers=headers
    )


def sse_error(message: str, code: str) -> bytes:
    """The OpenAI error event and `[DONE]` that end a stream whose worker failed mid-way."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n" + SSE_DONE


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def reason_of(exc: BaseException) -> str:
    """The hop-error reason of an upstream exception: `timeout` (--hop-timeout, --stream-idle-timeout) or
    `connection` (anything else, a connect timeout included)."""
    return "timeout" if isinstance(exc, HopTimeout) else "connection"


def kv_lost(role: str, reason: str) -> bool:
    """Whether a failed decode hop that carried kv_transfer_params should be resent without them (the decode
    worker recomputes the prompt). Baton's workers say so precisely (502 `kv_transfer_failed`); vLLM's answer a
    failed KV load (a prefill worker that died after its hop, an expired or foreign lease) with a plain 500
    under `kv_load_failure_policy: fail`, its default. A 500 from an engine that is really broken fails again
    without the params and then moves on to another worker, so resending once costs one attempt at most. A 403
    `kv_params_rejected` (the decode worker cannot verify the params' signature: another KV secret mid-rotation,
    or expired) makes the KV as unusable as a failed pull.

    A decode hop that carried params and got no answer within --hop-timeout is presumed to wait on a KV cache
    that will never come: vLLM's NIXL pull from a prefill worker SIGKILLed after its hop neither fails nor ends
    (vLLM 0.32 has no decode-side transfer timeout; seen on a loaded CI machine). Closing the hop aborts that
    request in vLLM; the resend recomputes. A decode worker that is merely slow costs one more attempt."""
    return (reason in (ErrorCode.KV_TRANSFER_FAILED, ErrorCode.KV_PARAMS_REJECTED)
            or (role == "decode" and reason in ("500", "timeout")))


def _limit(seconds: float | None) -> float | None:
    return seconds if seconds else None  # 0 / None: no limit


class Upstream:
    """The router's one client session to its workers, with the hop timeouts applied to every read."""

    def __init__(self, session: aiohttp.ClientSession, hop_timeout: float | None,
                 stream_idle_timeout: float | None) -> None:
        self.session = session
        self.hop_timeout = _limit(hop_timeout)
        self.idle_timeout = _limit(stream_idle_timeout)

    async def post(self, url: str, data: bytes, headers: dict) -> aiohttp.ClientResponse:
        """POST and wait for the response headers, at most `hop_timeout` seconds (time to first byte)."""
        limit = self.hop_timeout
        try:
            async with asyncio.timeout(limit):
                return await self.session.post(url, data=data, headers=headers)
        except TimeoutError as exc:
            if limit is not None and not isinstance(exc, aiohttp.ClientError):  # ours, not aiohttp's connect
                raise HopTimeout(f"no response within {limit:g}s (--hop-timeout)") from None
            raise

    async def chunk(self, resp: aiohttp.ClientResponse) -> bytes:
        """The next bytes of the body (b"" at its end), waiting at most `stream_idle_timeout` seconds."""
        limit = self.idle_timeout
        if limit is None:
            return await resp.content.readany()
        try:
            async with asyncio.timeout(limit):
                return await resp.content.readany()
        except TimeoutError as exc:
            if not isinstance(exc, aiohttp.ClientError):
                raise HopTimeout(f"no bytes for {limit:g}s (--stream-idle-timeout)") from None
            raise

    async def read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, with the idle timeout between its chunks."""
        if self.idle_timeout is None:
            return await resp.read()
        parts = []
        while chunk := await self.chunk(resp):
            parts.append(chunk)
        return b"".join(parts)
