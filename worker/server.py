"""The worker's OpenAI-compatible HTTP API: an ASGI app around any `Engine` (see `engine/types.py`).

    app = create_app(engine, served_model_name="llama", labels={"llmservice": "chat", "namespace": "ml"})
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app starts the engine in the background when it starts (so /health answers while a model loads) and stops
it on shutdown. Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON or SSE), GET /v1/models,
GET /health (liveness), GET /ready (readiness; its body and `X-Baton-KV-Fingerprint` header carry the engine's
KV-layout fingerprint, by which the router pairs prefill and decode workers), GET /metrics (Prometheus, vLLM
names).

Request ids: an `X-Request-Id` header, when given, is the engine's request id as is (the router relies on it
to correlate the prefill and decode hops and to abort); the response's `id` is that id with a `cmpl-` /
`chatcmpl-` prefix added unless it already has it. Without the header a random id is made. The response
always carries `X-Request-Id`.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`; a traceback never reaches the
client. A client that goes away (streaming or not) aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
import uvicorn
from baton.worker.choices import choice_requests, merge, with_first_logprob
from baton.worker.engine.types import (
    Engine,
    EngineError,
    EngineOverloaded,
    GenerationRequest,
    InvalidRequest,
    KVParamsRejected,
    KVTransferFailed,
    StepOutput,
    TokenLogprob,
)
from baton.worker.logprobs import LogprobRenderer
from baton.worker.metrics import CONTENT_TYPE, RequestTracker, WorkerMetrics
from baton.worker.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    RequestError,
    UsageInfo,
    error_body,
    new_request_id,
    parse_request,
    sse_event,
)
from baton.worker.request_trace import KVExports, RequestTrace, traced
from baton.worker.tracing import NO_TRACER, Tracer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton import launch

log = logging.getLogger("baton.worker.server")

REQUEST_ID_HEADER = "X-Request-Id"
RETRY_AFTER_SECONDS = "1"

Kind = Literal["completion", "chat"]


class ClientDisconnected(Exception):
    """The client went away before the response started."""


def engine_error_to_request_error(exc: EngineError) -> RequestError:
    """The HTTP face of the engine's errors (also used by unit tests of the mapping)."""
    if isinstance(exc, InvalidRequest):
        return RequestError(str(exc) or "invalid request", param=exc.param, status=400)
    if isinstance(exc, EngineOverloaded):
        return RequestError(
            str(exc) or "the engine is overloaded; retry later",
            status=503,
            type="service_unavailable_error",
            code="engine_overloaded",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    if isinstance(exc, KVParamsRejected):  # not signed by a prefill worker of this service: nothing was pulled
        return RequestError(
            f"kv_transfer_params refused ({exc.reason}): {exc}",
            param="kv_transfer_params",
            status=403,
            type="permission_error",
            code=launch.ErrorCode.KV_PARAMS_REJECTED,
        )
    if isinstance(exc, KVTransferFailed):
        return RequestError(
            f"KV cache transfer from the prefill worker failed: {exc}"
            if str(exc)
            else "KV cache transfer from the prefill worker failed",
            param="kv_transfer_params",
            status=502,
            type="kv_transfer_error",
            code=launch.ErrorCode.KV_TRANSFER_FAILED,
        )
    return RequestError(f"engine error: {exc}", status=500, type="internal_server_error", code="engine_error")


class _SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client going away and always closes its iterator.

    Starlette only watches for `http.disconnect` on older ASGI servers and never closes the body iterator when
    the client leaves; here the iterator's `finally` (which aborts the engine request) runs at once.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class _Server:
    def __init__(
        self,
        engine: Engine,
        served_model_name: str,
        labels: dict | None,
        engine_kind: str,
        manage_engine: bool,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.accepted_model_names = {served_model_name, getattr(engine, "model_name", served_model_name)}
        self.manage_engine = manage_engine
        self.metrics = WorkerMetrics(
            model_name=served_model_name,
            role=getattr(engine, "role", "both"),
            stats=engine.stats,
            labels=labels,
            engine_kind=engine_kind,
        )
        self.ready = not manage_engine
        # the engine's KV-layout fingerprint (`engine/fingerprint.py`), computed once when it was built: /ready
        # reports it, and the router hands KV only between workers that report the same one
        self.kv_fingerprint: str | None = getattr(engine, "kv_fingerprint", None)
        layout = getattr(engine, "kv_layout", None)
        self.kv_layout: dict | None = dataclasses.asdict(layout) if dataclasses.is_dataclass(layout) else None
        self.start_error: str | None = None
        self.stopping = False
        # SIGTERM (see DrainingServer below): /ready answers 503 so probes and the router stop sending
        # work here, while requests in flight, and new ones that still arrive, are served.
        self.draining = False
        self.inflight: set[str] = set()
        self._start_task: asyncio.Task | None = None
        # traces (`request_trace.py`): only with an endpoint; a prefill worker's KV leases get `kv_export` spans
        self.tracer = tracer
        self.role = getattr(engine, "role", "both")
        self.kv_exports: KVExports | None = None
        hook = getattr(engine, "on_kv_exported", None)
        if tracer.enabled and hook is not None and self.role in ("prefill", "both"):
            leases = getattr(getattr(engine, "core", None), "leases", None)
            self.kv_exports = KVExports(tracer, 2 * float(getattr(leases, "ttl", launch.KV_LEASE_SECONDS)))
            hook(self.kv_exports.exported)

    # ------------------------------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        if self.manage_engine:
            self._start_task = asyncio.create_task(self._start_engine(), name="baton-engine-start")

    async def _start_engine(self) -> None:
        try:
            await self.engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported through /health and the log
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("the engine failed to start")
            return
        self.ready = True
        log.info("engine started; serving %s (role %s)", self.served_model_name, self.engine.role)

    def begin_drain(self) -> None:
        """Leave the rotation: /ready turns 503 at once; serving goes on until the process decides to stop.

        Plain attribute writes only: called from a signal handler.
        """
        self.draining = True

    def kv_leases(self) -> int:
        """Prefill KV caches still waiting for their decode worker to pull them: a drain waits for them too."""
        try:
            return int(getattr(self.engine.stats(), "num_kv_leases", 0) or 0)
        except Exception:  # noqa: BLE001 - a dead engine has nothing left to hand over
            return 0

    def kv_lease_outcomes(self) -> tuple[int, int]:
        """(pulled, expired) KV leases since the start: a drain reports how the ones it waited for ended."""
        try:
            s = self.engine.stats()
            return int(getattr(s, "kv_leases_pulled_total", 0) or 0), int(getattr(s, "kv_leases_expired_total", 0) or 0)
        except Exception:  # noqa: BLE001
            return 0, 0

    async def shutdown(self) -> None:
        self.stopping = True
        self.ready = False
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        if self.manage_engine:
            try:
                await self.engine.stop()
            except Exception:
                log.exception("error while stopping the engine")
        # the spans still batched go out now (a thread: the exporter's HTTP client blocks)
        await asyncio.to_thread(self.tracer.shutdown)

    def alive(self) -> tuple[bool, str]:
        if self.start_error:
            return False, f"the engine failed to start: {self.start_error}"
        loop_error = getattr(self.engine, "loop_error", None)  # BatonEngine records why its loop died
        if loop_error is not None:
            return False, f"the engine loop failed: {loop_error}"
        for attr in ("is_alive", "alive", "is_healthy", "healthy"):
            probe = getattr(self.engine, attr, None)
            if probe is None:
                continue
            try:
                ok = probe() if callable(probe) else bool(probe)
            except Exception as exc:  # noqa: BLE001
                return False, f"the engine health check failed: {exc}"
            if not ok:
                return False, "the engine loop is not running"
            break
        try:
            self.engine.stats()
        except Exception as exc:  # noqa: BLE001
            return False, f"the engine does not answer: {exc}"
        return True, "ok"

    # ------------------------------------------------------------------------------------- requests

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.accepted_model_names:
            raise RequestError(
                f"The model `{model}` does not exist; this worker serves `{self.served_model_name}`.",
                param="model",
                status=404,
                code="model_not_found",
            )

    def check_ready(self) -> None:
        if self.stopping:
            raise RequestError(
                "the worker is shutting down",
                status=503,
                type="service_unavailable_error",
                code="shutting_down",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        if not self.ready:
            alive, why = self.alive()
            raise RequestError(
                "the engine is starting; retry shortly" if alive else why,
                status=503,
                type="service_unavailable_error",
                code="engine_not_ready",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )

    def request_ids(self, request: Request, prefix: str) -> tuple[str, str]:
        """(engine request id, response id)."""
        given = request.headers.get(REQUEST_ID_HEADER)
        if given:
            given = given.strip()
            if not given or len(given) > 256:
                raise RequestError(f"the {REQUEST_ID_HEADER} header must have 1 to 256 characters")
            response_id = given if given.startswith(prefix + "-") else f"{prefix}-{given}"
            return given, response_id
        rid = new_request_id(prefix)
        return rid, rid

    def max_tokens_for(
        self, prompt_len: int, requested: int | None, prompt_param: str, max_param: str
    ) -> int:
        limit = int(self.engine.max_model_len)
        if prompt_len == 0:
            raise RequestError("the prompt is empty", param=prompt_param)
        if prompt_len >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} "
                "tokens (at least one token must be left for the completion).",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                f"Please reduce the prompt or {max_param}.",
                param=max_param,
                code="context_length_exceeded",
            )
        return requested

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        self.check_model(req.model)
        self.check_ready()
        rid, response_id = self.request_ids(request, "cmpl")
        if isinstance(req.prompt, str):
            prompt_ids = self.engine.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            prompt_ids = list(req.prompt)
        max_tokens = self.max_tokens_for(len(prompt_ids), req.max_tokens, "prompt", "max_tokens")
        req.check_min_tokens(max_tokens, "max_tokens")
        gen = GenerationRequest(
            request_id=rid,
            prompt_token_ids=prompt_ids,
            sampling=req.sampling_params(max_tokens),
            kv_transfer_params=req.kv_transfer_params,
        )
        return await self.serve(
            request, gen, "completion", response_id, bool(req.stream), req.include_usage, arrival, req.num_choices
        )

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await request.body())
        self.check_model(req.model)
        self.check_ready()
        rid, response_id = self.request_ids(request, "chatcmpl")
        try:
            prompt = self.engine.tokenizer.apply_chat_template(
                req.template_messages(), add_generation_prompt=req.add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - a template that cannot render these messages
            raise RequestError(f"the chat template cannot render these messages: {exc}", param="messages")
        # The template already writes any special tokens (BOS) it wants.
        prompt_ids = self.engine.tokenizer.encode(prompt, add_special_tokens=False)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens_for(len(prompt_ids), req.requested_max_tokens, "messages", max_param)
        req.check_min_tokens(max_tokens, max_param)
        gen = GenerationRequest(
            request_id=rid,
            prompt_token_ids=prompt_ids,
            sampling=req.sampling_params(max_tokens),
            kv_transfer_params=req.kv_transfer_params,
        )
        return await self.serve(
            request, gen, "chat", response_id, bool(req.stream), req.include_usage, arrival, req.num_choices
        )

    async def serve(
        self,
        request: Request,
        gen: GenerationRequest,
        kind: Kind,
        response_id: str,
        stream: bool,
        include_usage: bool,
        arrival: float,
        n: int = 1,
    ) -> Response:
        """Serve `gen` with `n` choices (see `choices.py`): JSON, or SSE with the choices' chunks interleaved."""
        rid = gen.request_id
        if rid in self.inflight:
            raise RequestError(
                f"request id {rid!r} is already in flight on this worker", code="duplicate_request_id"
            )
        self.inflight.add(rid)
        tracker = self.metrics.tracker(arrival)
        created = int(time.time())
        it: AsyncIterator[StepOutput] | None = None
        handed_over = False
        try:
            try:
                gens = choice_requests(gen, n, getattr(self.engine, "role", "both"))
                index = {g.request_id: i for i, g in enumerate(gens)}
                it = self.engine.generate(gen) if len(gens) == 1 else merge([self.engine.generate(g) for g in gens])
                if self.tracer.enabled:
                    it = traced(it, RequestTrace(self.tracer, request.headers, rid, self.role, arrival,
                                                 self.kv_exports))
                if stream:
                    first = await _race_disconnect(request, it.__anext__())
                    handed_over = True
                    body = self._stream(it, first, gen, kind, response_id, created, include_usage, tracker, index)
                    return _SSEResponse(body, headers={REQUEST_ID_HEADER: rid, "Cache-Control": "no-cache",
                                                       **_server_timing(first)})
                outputs = await _race_disconnect(request, _collect(it, tracker, len(gens)))
            except EngineError as exc:
                raise engine_error_to_request_error(exc) from None
            except StopAsyncIteration:
                raise RequestError(
                    "the engine ended the request without output", status=500, type="internal_server_error"
                ) from None
            except ClientDisconnected:
                log.info("client went away before the response of %s started; aborted", rid)
                tracker.on_finish("abort")
                return Response(status_code=499)
            return JSONResponse(
                self._full_response(outputs, kind, response_id, created, gen, index),
                headers={REQUEST_ID_HEADER: rid, **_server_timing(*outputs)},
            )
        finally:
            if not handed_over:
                await self._cleanup(it, rid, tracker)

    async def _cleanup(self, it: AsyncIterator[StepOutput] | None, rid: str, tracker: RequestTracker) -> None:
        """Close the engine iterator (aborting the request if it has not finished); never raises."""
        with anyio.CancelScope(shield=True):
            try:
                if it is not None:
                    aclose = getattr(it, "aclose", None)
                    if aclose is not None:
                        await aclose()  # a no-op when the request finished; an abort when it did not
                    elif not tracker.done:
                        await self.engine.abort(rid)
            except Exception:
                log.exception("error while aborting request %s", rid)
            finally:
                if not tracker.done and tracker.last is not None:
                    tracker.on_finish("abort")  # went away mid-stream
                self.inflight.discard(rid)

    def _full_response(self, outputs: list[StepOutput], kind: Kind, response_id: str, created: int,
                       gen: GenerationRequest | None = None, index: dict[str, int] | None = None) -> dict:
        index = index or {}
        per: list[list[StepOutput]] = [[] for _ in range(max(1, len(index)))]
        for o in outputs:
            per[index.get(o.request_id, 0)].append(o)
        render = self._renderer(gen)
        n_prompt = next((o.num_prompt_tokens for o in reversed(outputs) if o.num_prompt_tokens), 0)
        n_gen = 0
        choices: list[Any] = []
        for i, outs in enumerate(per):
            last = outs[-1]
            text = "".join(o.text for o in outs)
            n_gen += last.num_generated_tokens or sum(len(o.token_ids) for o in outs)
            lps = [lp for o in outs for lp in (o.logprobs or ())]
            if kind == "completion":
                logprobs = render.completion(lps)[0] if render else None
                choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=last.finish_reason))
            else:
                logprobs = render.chat(lps) if render else None
                choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=text), logprobs=logprobs,
                                          finish_reason=last.finish_reason))
        usage = UsageInfo.of(n_prompt, n_gen)
        kv = next((o.kv_transfer_params for o in reversed(per[0]) if o.kv_transfer_params is not None), None)
        kv = with_first_logprob(kv, next((o.logprobs[0] for o in per[0] if o.logprobs), None))
        model = self.served_model_name
        if kind == "completion":
            resp: Any = CompletionResponse(
                id=response_id, created=created, model=model, usage=usage, kv_transfer_params=kv, choices=choices
            )
        else:
            resp = ChatCompletionResponse(
                id=response_id, created=created, model=model, usage=usage, kv_transfer_params=kv, choices=choices
            )
        return resp.model_dump(mode="json")

    def _renderer(self, gen: GenerationRequest | None) -> LogprobRenderer | None:
        """Logprob rendering for this response; None when the request asked for none."""
        if gen is None or gen.sampling.logprobs is None:
            return None
        return LogprobRenderer(self.engine.tokenizer)

    async def _stream(
        self,
        it: AsyncIterator[StepOutput],
        first: StepOutput,
        gen: GenerationRequest,
        kind: Kind,
        response_id: str,
        created: int,
        include_usage: bool,
        tracker: RequestTracker,
        index: dict[str, int] | None = None,
    ) -> AsyncIterator[str]:
        """SSE chunks; with n > 1 each choice's chunks carry its `index`, interleaved as the tokens come (the
        chat role chunk is sent for every index first, as OpenAI does). Logprobs of tokens whose text is held
        back (incremental detokenization, possible stop strings) travel with the next chunk that has text."""
        model = self.served_model_name
        rid = gen.request_id
        index = index or {rid: 0}
        n = len(index)
        render = self._renderer(gen)
        n_prompt = 0
        n_gen = [0] * n
        offsets = [0] * n  # completions text_offset per choice
        pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        first_lp: TokenLogprob | None = None  # choice 0's first token (a prefill hop hands it on)
        finished = 0

        def chunk(i: int, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict:
            lps, pending[i] = pending[i], []
            if kind == "completion":
                logprobs = None
                if render is not None:
                    logprobs, offsets[i] = render.completion(lps, offsets[i])
                c: Any = CompletionStreamResponse(
                    id=response_id,
                    created=created,
                    model=model,
                    choices=[CompletionChoice(index=i, text=text or "", logprobs=logprobs,
                                              finish_reason=finish_reason)],
                )
            else:
                delta = DeltaMessage(role="assistant", content="") if role else DeltaMessage(content=text)
                c = ChatCompletionStreamResponse(
                    id=response_id,
                    created=created,
                    model=model,
                    choices=[ChatStreamChoice(index=i, delta=delta, finish_reason=finish_reason,
                                              logprobs=render.chat(lps) if render is not None and not role else None)],
                )
            d = c.model_dump(mode="json")
            if not include_usage:
                d.pop("usage", None)
            if kind == "chat" and not role:
                if text is None:
                    d["choices"][0]["delta"] = {}
                else:
                    d["choices"][0]["delta"].pop("role", None)
            return d

        try:
            if kind == "chat":
                for i in range(n):
                    yield sse_event(chunk(i, None, None, role=True))
            out: StepOutput | None = first
            while out is not None:
                i = index.get(out.request_id, 0)
                tracker.on_output(len(out.token_ids), out.num_prompt_tokens)
                n_prompt = out.num_prompt_tokens or n_prompt
                n_gen[i] = out.num_generated_tokens or (n_gen[i] + len(out.token_ids))
                if out.logprobs:
                    pending[i].extend(out.logprobs)
                    if i == 0 and first_lp is None:
                        first_lp = out.logprobs[0]
                if out.finished:
                    d = chunk(i, out.text if (out.text or kind == "completion") else None, out.finish_reason)
                    if out.kv_transfer_params is not None:
                        d["kv_transfer_params"] = with_first_logprob(out.kv_transfer_params, first_lp)
                    yield sse_event(d)
                    finished += 1
                    if finished == n:
                        tracker.on_finish(out.finish_reason)
                        break
                elif out.kv_transfer_params is not None:  # a prefill hop's early announcement (KV_ANNOUNCE)
                    yield sse_event({"id": response_id, "object": "text_completion" if kind == "completion" else
                                     "chat.completion.chunk", "created": created, "model": model, "choices": [],
                                     "kv_transfer_params": out.kv_transfer_params})
                elif out.text:
                    yield sse_event(chunk(i, out.text, None))
                try:
                    out = await it.__anext__()
                except StopAsyncIteration:
                    out = None
            if not tracker.done:  # the engine ended the stream without a final output
                tracker.on_finish("abort")
            if include_usage:
                u: Any
                if kind == "completion":
                    u = CompletionStreamResponse(
                        id=response_id,
                        created=created,
                        model=model,
                        choices=[],
                        usage=UsageInfo.of(n_prompt, sum(n_gen)),
                    )
                else:
                    u = ChatCompletionStreamResponse(
                        id=response_id,
                        created=created,
                        model=model,
                        choices=[],
                        usage=UsageInfo.of(n_prompt, sum(n_gen)),
                    )
                yield sse_event(u.model_dump(mode="json"))
            yield SSE_DONE
        except EngineError as exc:
            err = engine_error_to_request_error(exc)
            log.warning("request %s failed while streaming: %s", rid, err.message)
            yield sse_event(err.body())
            yield SSE_DONE
        except Exception:  # the stream has started: report in-band, never a traceback
            log.exception("request %s failed while streaming", rid)
            yield sse_event(error_body(f"internal error (request {rid})", type="internal_server_error"))
            yield SSE_DONE
        finally:
            await self._cleanup(it, rid, tracker)


def _server_timing(*outputs: StepOutput) -> dict[str, str]:
    """The `Server-Timing` header of the first output that carries the engine's first-token timings (queue,
    prefill or kv_import): the router splits its TTFT into stages with it. Engines without them: no header."""
    timings = next((o.timings for o in outputs if getattr(o, "timings", None)), None)
    return {launch.Header.SERVER_TIMING: launch.format_server_timing(timings)} if timings else {}


async def _collect(it: AsyncIterator[StepOutput], tracker: RequestTracker, n: int = 1) -> list[StepOutput]:
    """Every output until all `n` choices have finished."""
    outputs: list[StepOutput] = []
    finished = 0
    async for out in it:
        outputs.append(out)
        tracker.on_output(len(out.token_ids), out.num_prompt_tokens)
        if out.finished:
            finished += 1
            if finished == n:
                tracker.on_finish(out.finish_reason)
                break
    if not outputs:
        raise RequestError(
            "the engine ended the request without output", status=500, type="internal_server_error"
        )
    if not tracker.done:
        tracker.on_finish(outputs[-1].finish_reason or "abort")
    return outputs


async def _race_disconnect(request: Request, awaitable) -> Any:
    """Await `awaitable`, but give up (cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(BaseException):
            await watcher
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def create_app(
    engine: Engine,
    *,
    served_model_name: str | None = None,
    labels: dict | None = None,
    engine_kind: str = "baton",
    manage_engine: bool = True,
    tracer: Tracer = NO_TRACER,
    metrics_port: int | None = None,
) -> FastAPI:
    """The worker's ASGI app.

    `labels` (`llmservice`, `namespace`, optional `role`) label every metric; missing ones come from env
    BATON_LLMSERVICE / BATON_NAMESPACE and the engine's role. With `manage_engine` (default) the app starts
    the engine in the background at startup (/ready turns 200 when done) and stops it at shutdown; without,
    the caller owns the engine's lifecycle and the app is ready at once. `tracer` (`tracing.create_tracer`)
    continues the caller's trace in spans of each request (`request_trace.py`); the app shuts it down (a last
    flush) at shutdown. Default: no tracing. With `metrics_port`, a request that reached the server on that port
    gets /metrics and nothing else (404): the pod's Prometheus port, which its NetworkPolicy opens to the metrics
    peers, must not be a way into the API.
    """
    served = served_model_name or engine.model_name
    server = _Server(engine, served, labels, engine_kind, manage_engine, tracer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = FastAPI(title="Baton worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.baton = server
    if metrics_port is not None:
        app.add_middleware(MetricsPortOnly, port=metrics_port)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = dict(exc.headers)
        rid = request.headers.get(REQUEST_ID_HEADER)
        if rid:
            headers.setdefault(REQUEST_ID_HEADER, rid)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(message, type=kind), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        rid = request.headers.get(REQUEST_ID_HEADER)
        where = f" (request {rid})" if rid else ""
        return JSONResponse(
            error_body(f"internal server error{where}", type="internal_server_error"), status_code=500
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat_completions(request)

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(
            id=served,
            root=getattr(engine, "model_name", served),
            max_model_len=getattr(engine, "max_model_len", None),
        )
        return ModelList(data=[card]).model_dump(mode="json")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive, why = server.alive()
        if alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            error_body(why, type="service_unavailable_error", code="engine_dead"), status_code=503
        )

    @app.get("/ready")
    async def ready() -> JSONResponse:
        alive, why = server.alive()
        fp = server.kv_fingerprint
        fp_header = {launch.Header.KV_FINGERPRINT: fp} if fp else {}
        if server.ready and alive and not server.stopping and not server.draining:
            body: dict = {"status": "ready"}
            if fp:
                body[launch.READY_KV_FINGERPRINT] = fp
                body[launch.READY_KV_LAYOUT] = server.kv_layout
            return JSONResponse(body, headers=fp_header)
        if not alive:
            reason = why
        elif server.stopping:
            reason = "shutting down"
        elif server.draining:
            reason = "draining: finishing the requests in flight before shutting down"
        else:
            reason = "the engine is starting"
        return JSONResponse(
            error_body(reason, type="service_unavailable_error", code="not_ready"),
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_SECONDS, **fp_header},
        )

    @app.get(launch.METRICS_PATH)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


class MetricsPortOnly:
    """ASGI middleware: on the metrics port (the local port the connection came in on, ASGI's `server`), only
    GET /metrics; anything else there is a 404. One server, one event loop and one drain serve both ports, so
    Prometheus sees a draining worker's metrics until it exits."""

    def __init__(self, app, port: int) -> None:
        self.app, self.port = app, port

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope.get("server") or (None, None))[1] == self.port \
                and scope.get("path") != launch.METRICS_PATH:
            body = json.dumps(error_body(f"only {launch.METRICS_PATH} is served on this port", type="not_found_error",
                                         code="not_found")).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- draining

#: A drain lasts at least this long even when idle: Kubernetes removes a terminating pod's endpoint while the
#: SIGTERM is sent, and routers and kube-proxy learn of it a few seconds later; requests sent meanwhile are served.
#: From the launch contract, which sizes the pods' grace period from the same budget.
DRAIN_ACCEPT_SECONDS = launch.DRAIN_ACCEPT_SECONDS
#: When a drain times out, the streams still running get this long before they are cut.
DRAIN_CUT_SECONDS = 1
#: How often a drain logs the number of requests in flight.
DRAIN_REPORT_SECONDS = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn whose SIGTERM drains: out of rotation at once, exit once the requests in flight are done.

    uvicorn alone stops accepting at once and gives requests in flight 10 s, so a scale-down cut long streams,
    and it re-raises the SIGTERM afterwards (exit by signal, not 0). Here the first SIGTERM marks the app as
    draining (/ready 503) and `on_tick` (uvicorn calls it every 0.1 s) ends the drain; a second SIGTERM or
    Ctrl-C forces the exit. In flight = uvicorn's request tasks (a stream counts until its last byte) plus, on
    a prefill worker, the KV caches the decode workers have not pulled yet (their requests are not done).
    Ctrl-C alone keeps uvicorn's short graceful shutdown (a developer at a terminal does not want to wait).
    """

    def __init__(self, config: uvicorn.Config, app_state: _Server, drain_timeout: float) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None
        self.forced = False
        self.cut_requests = 0
        self.clock: Callable[[], float] = time.monotonic  # tests step it by hand
        self._announced = False
        self._leases_at_start = (0, 0)  # (pulled, expired) when the drain began
        self._last_report = 0.0

    def in_flight(self) -> int:
        return len(self.server_state.tasks)

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: flags only; on_tick logs and decides.
        if self.drain_started is not None or (self.should_exit and sig == signal.SIGTERM):
            self.cut_requests = self.in_flight()
            self.forced = self.force_exit = self.should_exit = True
        elif sig == signal.SIGTERM:
            self.drain_started = self.clock()
            self.app_state.begin_drain()
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            self._drain_tick()
        return await super().on_tick(counter)

    def _drain_tick(self) -> None:
        now = self.clock()
        elapsed = now - self.drain_started
        in_flight, leases = self.in_flight(), self.app_state.kv_leases()
        pending = f"{in_flight} requests in flight" + (f", {leases} KV caches not pulled yet" if leases else "")
        least = min(DRAIN_ACCEPT_SECONDS, self.drain_timeout)
        if not self._announced:
            self._announced = True
            self._last_report = now
            self._leases_at_start = self.app_state.kv_lease_outcomes()
            log.info(
                "SIGTERM: draining; /ready answers 503, %s; exiting when none are left (after at least %.0fs) or "
                "after %.0fs; a second signal exits now", pending, least, self.drain_timeout,
            )
        if in_flight == 0 and leases == 0 and elapsed >= least:
            log.info("drained in %.1fs: no request in flight%s; exiting", elapsed, self._lease_report())
            self.should_exit = True
        elif elapsed >= self.drain_timeout:
            log.warning("drain timeout (%.0fs): cutting what is left (%s)%s; exiting", self.drain_timeout, pending,
                        self._lease_report())
            self.config.timeout_graceful_shutdown = DRAIN_CUT_SECONDS
            self.should_exit = True
        elif now - self._last_report >= DRAIN_REPORT_SECONDS:
            self._last_report = now
            log.info("draining: %s after %.0fs", pending, elapsed)

    def _lease_report(self) -> str:
        """How the KV leases of the drain ended: pulled by their decode worker, or expired (the prompt is then
        recomputed)."""
        pulled, expired = self.app_state.kv_lease_outcomes()
        pulled, expired = pulled - self._leases_at_start[0], expired - self._leases_at_start[1]
        return f"; KV leases during the drain: {pulled} pulled, {expired} expired" if pulled or expired else ""
