"""A Baton worker's spans of the requests it serves, continuing the caller's trace (W3C `traceparent`).

    baton.worker.request       the hop on this worker: HTTP arrival -> the engine's last output
      queue                    the engine's queue, until the prefill (or KV import) was scheduled
      prefill | kv_import      the prompt's forward / the KV pull, until the first token
      decode                   the first token -> the last (not on a prefill hop: it makes one token)
      kv_export                prefill worker: a transport shipping this hop's KV lease (after the hop answered)

queue, prefill and kv_import end at the engine's first-token instant (`StepOutput.first_token_at`) and last
exactly its `timings`, the numbers the worker sends as `Server-Timing` and the router turns into
`baton_router_ttft_stage_seconds`: a trace and the stage metrics agree on every request.

Only built when tracing is on (`server.py` wraps the engine's outputs in `traced` then); tracing off, a request
creates nothing here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from baton.worker.engine.types import StepOutput
from baton.worker.tracing import SERVER, SpanName, Tracer

from baton.launch import Timing

#: the key of `kv_transfer_params` that names a prefill hop's KV lease (vLLM's protocol)
LEASE_KEY = "remote_request_id"
#: the span of the work a first token cost, by its Server-Timing name
WORK_SPANS = {Timing.PREFILL: SpanName.PREFILL, Timing.KV_IMPORT: SpanName.KV_IMPORT}


class KVExports:
    """Prefill worker: which request span each KV lease belongs to, until a transport has shipped it; then its
    `kv_export` span. Leases never pulled (expired) are forgotten after `ttl_seconds`."""

    def __init__(self, tracer: Tracer, ttl_seconds: float) -> None:
        self.tracer = tracer
        self.ttl = ttl_seconds
        self._parents: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()  # `exported` runs on a transport's thread

    def expect(self, lease_id: str, parent: Any) -> None:
        now = time.monotonic()
        with self._lock:
            for stale in [k for k, (_, t) in self._parents.items() if now - t > self.ttl]:
                del self._parents[stale]
            self._parents[lease_id] = (parent, now)

    def exported(self, lease_id: str, started: float, ended: float) -> None:
        """`engine.on_kv_exported`'s callback."""
        with self._lock:
            entry = self._parents.pop(lease_id, None)
        if entry is not None:
            self.tracer.record(SpanName.KV_EXPORT, parent=entry[0], start=started, end=ended,
                               attributes={"baton.kv.lease": lease_id})


class RequestTrace:
    """The spans of one request on this worker, fed with its engine outputs."""

    def __init__(self, tracer: Tracer, headers: Mapping[str, str], request_id: str, role: str, arrival: float,
                 exports: KVExports | None = None) -> None:
        self.tracer = tracer
        self.exports = exports
        self.span = tracer.start(SpanName.WORKER_REQUEST, parent=tracer.extract(headers), at=arrival, kind=SERVER,
                                 attributes={"baton.request_id": request_id, "baton.role": role})
        self.first_token_at: float | None = None
        self.last_at: float | None = None
        self.prompt_tokens = 0
        self.tokens = 0
        self.finish_reason: str | None = None

    def output(self, out: StepOutput) -> None:
        now = time.monotonic()
        if out.timings and out.first_token_at is not None and self.first_token_at is None:
            self.first_token_at = end = out.first_token_at
            work = next(((WORK_SPANS[n], s) for n, s in out.timings.items() if n in WORK_SPANS), None)
            if work is not None:
                name, seconds = work
                started = end - seconds
                if Timing.QUEUE in out.timings:
                    self.tracer.record(SpanName.QUEUE, parent=self.span, start=started - out.timings[Timing.QUEUE],
                                       end=started)
                self.tracer.record(name, parent=self.span, start=started, end=end)
        lease = (out.kv_transfer_params or {}).get(LEASE_KEY)
        if lease and self.exports is not None:
            self.exports.expect(str(lease), self.span)
        self.prompt_tokens = out.num_prompt_tokens or self.prompt_tokens
        self.tokens += len(out.token_ids)
        if out.token_ids:
            self.last_at = now
        if out.finished:
            self.finish_reason = out.finish_reason

    def end(self, error: str | None = None) -> None:
        if self.first_token_at is not None and self.last_at is not None and self.tokens > 1:
            self.tracer.record(SpanName.DECODE, parent=self.span, start=self.first_token_at, end=self.last_at,
                               attributes={"baton.tokens": self.tokens - 1})
        attributes: dict[str, Any] = {"baton.prompt_tokens": self.prompt_tokens, "baton.completion_tokens": self.tokens}
        if self.finish_reason:
            attributes["baton.finish_reason"] = self.finish_reason
        self.tracer.finish(self.span, error=error, attributes=attributes)


async def traced(it: AsyncIterator[StepOutput], trace: RequestTrace) -> AsyncIterator[StepOutput]:
    """`it`'s outputs, each shown to `trace`; the trace ends with the iterator (exhausted, failed or closed --
    closing it closes `it`, which aborts the engine request as closing `it` itself would)."""
    error: str | None = None
    try:
        async for out in it:
            trace.output(out)
            yield out
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        trace.end(error)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
