"""One request as the router handles it: the body helpers (the client's KV parameters stripped, the prompt
prefix that prefix-aware hashes) and the per-request state the handler fills in (outcome, first token, the
hops' Server-Timing for the TTFT stages). Pure: no I/O."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from baton.worker.router.stages import Hop

SSE_DONE = b"data: [DONE]\n\n"
KV_PARAMS = "kv_transfer_params"  # vLLM's protocol field that chains the prefill hop to the decode hop
XARGS = "vllm_xargs"  # vLLM copies it into SamplingParams.extra_args, where connectors read KV_PARAMS too


def strip_kv_params(body: dict) -> dict | None:
    """`body` without the client's KV transfer parameters (top-level and inside `vllm_xargs`); None when it
    carries none (the raw bytes can then be forwarded as they are).

    Why: those parameters tell a decode worker which host:port to connect to and which lease to pull. A
    client's own would let it point a worker at any address or read another request's KV, so only the
    parameters the router got back from its own prefill hop may ever reach a worker.
    """
    xargs = body.get(XARGS)
    nested = isinstance(xargs, dict) and KV_PARAMS in xargs
    if KV_PARAMS not in body and not nested:
        return None
    clean = {k: v for k, v in body.items() if k != KV_PARAMS}
    if nested:
        clean[XARGS] = {k: v for k, v in xargs.items() if k != KV_PARAMS}
    return clean


def compact_json(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def routing_key(body: dict, limit: int) -> str | None:
    """The start of the prompt (text) that prefix-aware hashes; None when there is none."""
    prompt = body.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt[:limit]
        if isinstance(prompt, list):
            return ",".join(str(t) for t in prompt[: max(1, limit // 4)])
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    size = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        piece = f"{m.get('role', '')}:{content or ''}\n"
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit] if parts else None


def sse_payloads(events: bytes) -> Iterator[bytes]:
    """The `data:` payloads of complete server-sent events, line by line (an OpenAI-style stream puts one JSON
    object, or `[DONE]`, on each data line)."""
    for line in events.split(b"\n"):
        if line.startswith(b"data:"):
            yield line[5:].strip()


class RequestState:
    __slots__ = ("arrival", "decode_hop", "done", "error", "finished", "first_at", "kv_from", "outcome",
                 "prefill_hop", "recorded", "request_id", "span", "tokens", "usage_tokens")

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.outcome = "error"
        self.first_at: float | None = None
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.done = False
        self.error = False
        self.finished = False
        self.recorded = False
        self.prefill_hop: Hop | None = None  # the prefill hop that produced the KV (TTFT stages)
        self.kv_from: str | None = None  # that prefill worker's KV-layout fingerprint (None: unknown; pairing.py)
        self.decode_hop: Hop | None = None  # the last hop's attempt that answered 200
        self.request_id: str | None = None  # X-Request-Id of both hops
        self.span: Any = None  # the request's trace span (`spans.py`); None when tracing is off

    def scan(self, data: bytes) -> None:
        """Look at complete SSE events (for TTFT/TPOT and the outcome); never changes them."""
        for payload in sse_payloads(data):
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if "error" in obj:
                self.error = True
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            for choice in obj.get("choices") or ():
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    self.tokens += 1
                    if self.first_at is None:
                        self.first_at = -1.0  # set to the write's time by the caller
