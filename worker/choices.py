"""`n > 1`: one HTTP request, several engine requests (choices), their outputs merged into one stream.

Choice 0 is the request as asked (its request id, seed and `kv_transfer_params`), so `n=1` is exactly the old
path and a seeded choice 0 equals the `n=1` answer. Choice i > 0 gets request id `<id>#<i>.<random>` and, with a
seed, seed + i (vLLM's OpenAI server does the same: one engine request per choice, seeds offset by the index).
The random part: a retried request (the router resends the same X-Request-Id after a 502) must not meet the
queued abort of its previous attempt's choices, which the engine matches by request id.

Disaggregation: a prefill hop (`prefill` role, or `kv_transfer_params.do_remote_decode`) computes choice 0 only
(one first token, one KV lease: the router only reads `kv_transfer_params` from it); the decode hop imports
that KV for choice 0 and recomputes the prompt locally for choices 1..n-1 (they carry no kv_transfer_params).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator

from baton.worker.engine.types import FIRST_TOKEN_LOGPROBS, GenerationRequest, StepOutput, TokenLogprob


def choice_requests(gen: GenerationRequest, n: int, role: str) -> list[GenerationRequest]:
    """The engine requests for `n` choices of `gen` (just `[gen]` for n=1 and for a prefill hop)."""
    kv = gen.kv_transfer_params or {}
    if n <= 1 or role == "prefill" or kv.get("do_remote_decode"):
        return [gen]
    sp = gen.sampling
    attempt = secrets.token_hex(4)
    return [gen] + [
        dataclasses.replace(
            gen,
            request_id=f"{gen.request_id}#{i}.{attempt}",
            sampling=dataclasses.replace(sp, seed=None if sp.seed is None else sp.seed + i),
            kv_transfer_params=None,
        )
        for i in range(1, n)
    ]


async def merge(streams: list[AsyncIterator[StepOutput]]) -> AsyncIterator[StepOutput]:
    """Outputs of all `streams` as they come (each stream's order kept); the first error of any is raised.

    All streams start at once, so the engine batches the choices. Nothing is yielded before every stream has
    produced its first output: the engine raises its request errors (InvalidRequest, EngineOverloaded,
    KVTransferFailed of choice 0's KV import) before a request's first output, and the HTTP status must still
    be open when they come (a 502 lets the router recompute; an error inside a started stream cannot). Closing
    the merged iterator (client gone) closes every stream, which aborts the choices still running."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, it: AsyncIterator[StepOutput]) -> None:
        try:
            async for out in it:
                queue.put_nowait((k, out))
            queue.put_nowait((k, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer; CancelledError (closing) is not
            queue.put_nowait((k, exc))

    tasks = [asyncio.ensure_future(pump(k, it)) for k, it in enumerate(streams)]
    try:
        left = len(streams)
        waiting = set(range(len(streams)))  # streams without a first output yet
        held: list[StepOutput] = []
        while left:
            k, item = await queue.get()
            waiting.discard(k)
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            elif waiting:
                held.append(item)
            else:
                for out in held:
                    yield out
                held.clear()
                yield item
        for out in held:
            yield out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in streams:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def with_first_logprob(kv: dict | None, first: TokenLogprob | None) -> dict | None:
    """A prefill hop's `kv_transfer_params` plus the first token's logprobs, which only this worker has (the
    decode worker emits them for the first token; see `Sequence._check_import`)."""
    if kv is None or first is None:
        return kv
    return {**kv, FIRST_TOKEN_LOGPROBS: [first.to_dict()]}
