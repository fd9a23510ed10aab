"""The router pairs prefill and decode workers by KV-layout fingerprint (`worker/router/pairing.py`, issue 23):
KV moves only between workers that report the same fingerprint in their /ready body (or where one side reports
none, as vLLM's /health does); with no matching pair the decode worker recomputes the prompt. Pure functions,
the health check's parsing, and the router over in-process stub workers whose /ready bodies carry fingerprints
and whose decode stubs record which prefill worker's kv_transfer_params they got."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest
from baton.worker.router import pairing
from baton.worker.router.pool import parse_fingerprint

from baton import launch

from .test_router import RunningRouter, Stub

HANDOFFS = launch.Metric.ROUTER_KV_HANDOFFS
MISMATCH = launch.Metric.ROUTER_LAYOUT_MISMATCH


# ---------------------------------------------------------------------------------------------- pure


@dataclass
class W:
    name: str
    fingerprint: str | None


def test_compatible_and_match():
    assert pairing.compatible("a", "a") and not pairing.compatible("a", "b")
    assert pairing.compatible(None, "b") and pairing.compatible("a", None) and pairing.compatible(None, None)
    assert pairing.match("a", "a") == "same" and pairing.match("a", "b") == "cross"
    assert pairing.match(None, "b") == pairing.match("a", None) == "unknown"


def test_partners_and_for_kv():
    da, db, du = W("da", "A"), W("db", "B"), W("du", None)
    assert pairing.partners("A", [da, db, du]) == [da, du]
    assert pairing.partners(None, [da, db]) == [da, db]
    assert pairing.for_kv("A", [da, db]) == ([da], False)
    assert pairing.for_kv("C", [da, db]) == ([da, db], True)  # none fits: all of them, to recompute


def test_with_partner_prefers_prefill_workers_whose_layout_decode_shares():
    pa, pb, pu = W("pa", "A"), W("pb", "B"), W("pu", None)
    assert pairing.with_partner([pa, pb], [W("da", "A")]) == [pa]
    assert pairing.with_partner([pa, pb, pu], [W("dc", "C")]) == [pu]
    assert pairing.with_partner([pa, pb], [W("dc", "C")]) == []
    assert pairing.with_partner([pa, pb], [W("du", None)]) == [pa, pb]  # unknown decode: matches anything
    assert pairing.with_partner([pa], []) == []


def test_parse_fingerprint_from_the_ready_body_or_header():
    body = json.dumps({"status": "ready", launch.READY_KV_FINGERPRINT: "kv1-abc"}).encode()
    assert parse_fingerprint(body) == "kv1-abc"
    assert parse_fingerprint(b"", "kv1-hdr") == "kv1-hdr"  # no body: the header
    assert parse_fingerprint(b"") is None  # vLLM's /health: unknown
    assert parse_fingerprint(b'{"status": "ready"}') is None
    assert parse_fingerprint(b"not json {") is None
    assert parse_fingerprint(b"[1, 2]") is None
    assert parse_fingerprint(json.dumps({launch.READY_KV_FINGERPRINT: 7}).encode()) is None


# ---------------------------------------------------------------------------------------------- stub workers


class StubWorker(Stub):
    """A worker of one role whose GET /ready reports `fingerprint` (None: an empty body, as vLLM's /health). A
    prefill stub answers the prefill hop with kv_transfer_params naming itself; a decode stub records the
    kv_transfer_params of every request it gets (None when the router sent none: a recompute) and answers a
    one-token completion; `status` (a decode stub) makes it refuse with that status instead."""

    def __init__(self, name: str, fingerprint: str | None) -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.received: list[dict | None] = []
        self.status = 200
        super().__init__(self.answer, health_body=fingerprint is not None,
                         health_extra={launch.READY_KV_FINGERPRINT: fingerprint} if fingerprint else None)

    async def answer(self, request):
        from aiohttp import web

        body = await request.json()
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_decode"):  # the prefill hop
            return web.json_response({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                                      "kv_transfer_params": {"from": self.name, "fp": self.fingerprint}})
        if self.status != 200:
            return web.json_response({"error": {"message": "busy", "code": "busy"}}, status=self.status)
        self.received.append(kv)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": "m",
                                  "choices": [{"index": 0, "text": self.name, "finish_reason": "length"}]})


@pytest.fixture
def fleet():
    """fleet(prefill={name: fingerprint}, decode={...}, **router config) -> (stubs by name, router)."""
    started: list = []

    def make(prefill: dict, decode: dict, **config) -> tuple[dict[str, StubWorker], RunningRouter]:
        stubs = {n: StubWorker(n, fp).start() for n, fp in {**prefill, **decode}.items()}
        started.extend(stubs.values())
        router = RunningRouter(prefill=[stubs[n].base_url for n in prefill],
                               decode=[stubs[n].base_url for n in decode], seed=1, **config)
        started.append(router.start())
        return stubs, router

    yield make
    for s in reversed(started):
        s.stop()


def complete(router: RunningRouter, prompt: str = "hello") -> httpx.Response:
    r = httpx.post(router.base_url + "/v1/completions", timeout=30,
                   json={"model": "m", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r


def counts(router: RunningRouter) -> dict[str, float]:
    from .test_router import settled

    m = settled(router)
    out = {match: m.get((HANDOFFS, (("match", match),)), 0.0) for match in launch.KV_HANDOFF_MATCHES}
    out["mismatch"] = m.get((MISMATCH, ()), 0.0)
    out["recomputed"] = m.get(("baton_router_requests_total", (("outcome", "fallback_recompute"),)), 0.0)
    return out


# ---------------------------------------------------------------------------------------------- router


def test_two_layouts_side_by_side_never_cross(fleet):
    """Prefill A and B, decode A and B (a rollout half done): every handoff is A->A or B->B."""
    # decode listed in the other order: the prefill and decode policies share a seed, so without pairing their
    # random choices would go pA->dB and pB->dA in lockstep (listed alike, they would pair by luck)
    stubs, router = fleet({"pA": "A", "pB": "B"}, {"dB": "B", "dA": "A"})
    n = 24
    for i in range(n):
        complete(router, f"prompt {i}")
    for d in ("dA", "dB"):
        got = stubs[d].received
        assert got, f"{d} got no request"  # both pairs served
        assert all(kv is not None for kv in got)  # every request was a KV handoff ...
        assert {kv["fp"] for kv in got} == {stubs[d].fingerprint}, (d, got)  # ... from its own layout
    assert stubs["pA"].calls and stubs["pB"].calls
    assert counts(router) == {"same": n, "unknown": 0, "cross": 0, "mismatch": 0, "recomputed": 0}


def test_no_matching_decode_recomputes_without_a_prefill_hop(fleet):
    """Only prefill A and decode B: the prompt is recomputed on decode (no kv_transfer_params), and counted."""
    stubs, router = fleet({"pA": "A"}, {"dB": "B"})
    for i in range(5):
        assert complete(router, f"p{i}").json()["choices"][0]["text"] == "dB"
    assert stubs["dB"].received == [None] * 5
    assert stubs["pA"].calls == 0  # its KV would fit no decode worker: not computed at all
    assert counts(router) == {"same": 0, "unknown": 0, "cross": 0, "mismatch": 5, "recomputed": 5}


def test_prefill_chosen_so_a_partner_exists(fleet):
    """Prefill A and B, decode B only: every prefill hop goes to B, every handoff is B->B."""
    stubs, router = fleet({"pA": "A", "pB": "B"}, {"dB": "B"})
    for i in range(8):
        complete(router, f"p{i}")
    assert stubs["pA"].calls == 0 and stubs["pB"].calls == 8
    assert [kv["fp"] for kv in stubs["dB"].received] == ["B"] * 8
    assert counts(router) == {"same": 8, "unknown": 0, "cross": 0, "mismatch": 0, "recomputed": 0}


def test_partner_lost_during_the_hop_recomputes_rather_than_crossing(fleet):
    """Prefill A, decode A (refuses with 503) and decode B: the KV is not handed to B; B recomputes."""
    stubs, router = fleet({"pA": "A"}, {"dA": "A", "dB": "B"})
    stubs["dA"].status = 503
    complete(router)
    assert stubs["dB"].received == [None]
    c = counts(router)
    assert c["cross"] == 0 and c["same"] == 1 and c["mismatch"] == 1 and c["recomputed"] == 1


def test_unknown_fingerprints_pair_with_anything(fleet):
    """vLLM-like workers (/ready 200 without a body) report no fingerprint: they still get KV handoffs."""
    stubs, router = fleet({"pA": "A", "pU": None}, {"dU": None})
    for i in range(6):
        complete(router, f"p{i}")
    assert len(stubs["dU"].received) == 6 and all(kv is not None for kv in stubs["dU"].received)
    assert stubs["pA"].calls and stubs["pU"].calls
    assert counts(router) == {"same": 0, "unknown": 6, "cross": 0, "mismatch": 0, "recomputed": 0}

    stubs2, router2 = fleet({"pU2": None}, {"dA2": "A"})  # unknown prefill, known decode
    complete(router2)
    assert stubs2["dA2"].received == [{"from": "pU2", "fp": None}]
    assert counts(router2)["unknown"] == 1
