"""Reading a prefill hop that announces its KV early (layer-wise export; `baton.launch.KV_ANNOUNCE`).

A Baton prefill worker asked for it streams the hop as SSE and sends the transfer parameters in an event of
their own (`choices: []`) as soon as its lease exists -- before the prefill's forward has finished. The router
starts the decode hop on that event; the decode worker pulls the KV layer by layer while the prefill computes
and then computes the first token itself. The rest of the prefill stream is drained in the background (a
prefill that fails after announcing shows up as a failed KV pull on the decode hop, which the router already
answers by recomputing).
"""
from __future__ import annotations

import json

from baton.worker.router.request import sse_payloads


class SSEEvents:
    """Incremental `data:` payloads of a server-sent-events byte stream (events end with a blank line)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk.replace(b"\r\n", b"\n")
        complete, sep, self._buf = self._buf.rpartition(b"\n\n")
        return [p.decode("utf-8", "replace") for p in sse_payloads(complete + sep)]


def announced_kv(payload: str, key: str = "kv_transfer_params") -> tuple[dict | None, str | None]:
    """(kv_transfer_params, None) for an event carrying them; (None, error message) for an in-band error or
    the end of the stream; (None, None) for any other event."""
    if payload.strip() == "[DONE]":
        return None, "the prefill stream ended without kv_transfer_params"
    try:
        event = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    if "error" in event:
        err = event["error"]
        return None, str(err.get("message") if isinstance(err, dict) else err)
    kv = event.get(key)
    return (kv, None) if isinstance(kv, dict) and kv else (None, None)
