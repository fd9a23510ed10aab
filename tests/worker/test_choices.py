"""`n > 1` plumbing (worker/choices.py): the engine requests of the choices and the merge of their streams."""
from __future__ import annotations

import asyncio

import pytest
from baton.worker.choices import choice_requests, merge, with_first_logprob
from baton.worker.engine.types import (
    FIRST_TOKEN_LOGPROBS,
    GenerationRequest,
    KVTransferFailed,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)


def gen(**kw) -> GenerationRequest:
    return GenerationRequest("r1", [1, 2, 3], SamplingParams(seed=kw.pop("seed", 10)), **kw)


def test_choice_requests():
    g = gen(kv_transfer_params={"do_remote_prefill": True, "first_token_ids": [4]})
    a = choice_requests(g, 3, "decode")
    assert a[0] is g  # choice 0 is the request as asked: n=1 behaviour, KV import included
    assert [r.sampling.seed for r in a] == [10, 11, 12]
    assert [r.kv_transfer_params for r in a[1:]] == [None, None]  # recomputed locally
    assert len({r.request_id for r in a}) == 3 and all(r.request_id.startswith("r1#") for r in a[1:])
    b = choice_requests(g, 3, "decode")
    # a retry of the same request id must not share ids with the last attempt's choices (their aborts are
    # queued in the engine under those ids)
    assert {r.request_id for r in a[1:]}.isdisjoint(r.request_id for r in b[1:])
    assert [r.sampling.seed for r in choice_requests(gen(seed=None), 2, "both")] == [None, None]
    assert choice_requests(g, 1, "both") == [g]
    assert choice_requests(gen(), 3, "prefill") == [choice_requests(gen(), 3, "prefill")[0]]
    hop = gen(kv_transfer_params={"do_remote_decode": True})
    assert choice_requests(hop, 3, "both") == [hop]  # a prefill hop computes choice 0 only


def out(rid: str, i: int, finished: bool = False) -> StepOutput:
    return StepOutput(rid, [i], str(i), finished, "length" if finished else None)


class Stream:
    """A fake engine stream: yields after `delays`, may raise at the end; records whether it was closed."""

    def __init__(self, rid: str, delays: list[float], error: Exception | None = None) -> None:
        self.rid, self.delays, self.error, self.closed = rid, delays, error, False

    async def run(self):
        try:
            for i, d in enumerate(self.delays):
                await asyncio.sleep(d)
                yield out(self.rid, i, i == len(self.delays) - 1 and self.error is None)
            if self.error is not None:
                await asyncio.sleep(0.05)
                raise self.error
        finally:
            self.closed = True


async def test_merge_interleaves_and_keeps_each_order():
    a, b = Stream("a", [0.0, 0.03, 0.03]), Stream("b", [0.01, 0.03, 0.03])
    got = [(o.request_id, o.token_ids[0]) async for o in merge([a.run(), b.run()])]
    assert [t for r, t in got if r == "a"] == [0, 1, 2] and [t for r, t in got if r == "b"] == [0, 1, 2]
    assert [r for r, _ in got] != ["a", "a", "a", "b", "b", "b"]  # interleaved
    assert a.closed and b.closed


async def test_merge_raises_an_early_error_before_any_output():
    """Choice 1 has output at once, choice 0 fails later but before its first output (a KV import that
    fails): the error must come first, so the server can still answer 502 (the router then recomputes)."""
    ok, failing = Stream("ok", [0.0, 0.0, 0.0]), Stream("kv", [], KVTransferFailed("peer gone"))
    it = merge([failing.run(), ok.run()])
    with pytest.raises(KVTransferFailed):
        await it.__anext__()
    assert ok.closed  # the other choices were aborted


async def test_merge_close_aborts_every_stream():
    a, b = Stream("a", [0.0] + [0.01] * 50), Stream("b", [0.0] + [0.01] * 50)
    it = merge([a.run(), b.run()])
    await it.__anext__()
    await it.aclose()
    assert a.closed and b.closed


def test_with_first_logprob():
    lp = TokenLogprob(4, -1.5, 2, ((7, -1.0), (4, -1.5)))
    kv = with_first_logprob({"first_token_ids": [4]}, lp)
    assert TokenLogprob.from_dict(kv[FIRST_TOKEN_LOGPROBS][0]) == lp
    assert with_first_logprob(None, lp) is None and with_first_logprob({"a": 1}, None) == {"a": 1}
