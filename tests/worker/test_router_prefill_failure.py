"""The router's prefill-failure policy (`spec.router.prefillFailure`, `worker/router/prefill_failure.py`) and the
TTFT stage arithmetic (`worker/router/stages.py`): the pure decisions, the flags, and the router over stub
workers -- a failing prefill worker retried on another, all failing with `never` (a fast 503 + Retry-After, no
hang even with a prefill worker that never answers), `always` (recompute), `whenHeadroom` both ways.

Stub workers and the router helpers come from test_router.py / test_router_hardening.py.
"""

from __future__ import annotations

import time

import httpx
import pytest

from baton import launch

pytest.importorskip("torch")


from .test_router import NOT_A_HANG, RunningRouter, dead_url, hop_errors, outcome, settled, silent_socket
from .test_router import _first as first
from .test_router_hardening import ROUTER_KV, Worker, answer, prefill_500, prefill_ok, wait_ready

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


def failures(m: dict, name: str) -> float:
    return m.get((launch.Metric.ROUTER_PREFILL_FAILURES, (("outcome", name),)), 0.0)


# ------------------------------------------------------------------------------------------- pure decisions


def test_decide():
    from baton.worker.router.prefill_failure import RECOMPUTE, REJECT, RETRY, PrefillFailurePolicy, decide

    default = PrefillFailurePolicy()
    assert (default.retries, default.recompute, default.retry_after) == (1, "whenHeadroom", 5)
    # retries: another prefill worker while there is one and retries are left
    assert decide(default, 1, other_prefill=True, headroom=False) == RETRY
    assert decide(default, 2, other_prefill=True, headroom=True) == RECOMPUTE  # retries spent
    assert decide(default, 1, other_prefill=False, headroom=True) == RECOMPUTE  # no other prefill worker
    assert decide(PrefillFailurePolicy(retries=0), 1, other_prefill=True, headroom=True) == RECOMPUTE
    assert decide(PrefillFailurePolicy(retries=3), 3, other_prefill=True, headroom=False) == RETRY
    # then recompute by mode
    for mode, headroom, want in (("whenHeadroom", True, RECOMPUTE), ("whenHeadroom", False, REJECT),
                                 ("always", False, RECOMPUTE), ("always", True, RECOMPUTE),
                                 ("never", True, REJECT), ("never", False, REJECT)):
        assert decide(PrefillFailurePolicy(recompute=mode), 2, other_prefill=False, headroom=headroom) == want
    for bad in ({"recompute": "sometimes"}, {"retries": -1}, {"retry_after": 0}, {"tpot_slo": 0.0}):
        with pytest.raises(ValueError):
            PrefillFailurePolicy(**bad)


def test_headroom_is_recent_tpot_p90_against_the_slo():
    from baton.worker.router.prefill_failure import MIN_SAMPLES, TPOTWindow, has_headroom

    fast, slow = [0.01] * 20, [0.01] * 17 + [0.06] * 3  # p90 0.01 / p90 0.06 (3 of 20 slow: above p90)
    assert has_headroom(fast, 0.05) and not has_headroom(slow, 0.05)
    assert has_headroom([0.039] * 20, 0.05) and not has_headroom([0.041] * 20, 0.05)  # 80 % of the SLO
    assert has_headroom(slow, None)  # no SLO: nothing to protect
    assert has_headroom([1.0] * (MIN_SAMPLES - 1), 0.05)  # too few samples: no evidence of pressure

    now = [100.0]
    window = TPOTWindow(window=30, clock=lambda: now[0])
    for _ in range(20):
        window.observe(0.2)
    assert len(window.values()) == 20 and not has_headroom(window.values(), 0.05)
    now[0] += 31  # the slow TPOTs age out: headroom again
    assert window.values() == [] and has_headroom(window.values(), 0.05)


def test_headroom_gate_holds_its_decision_in_a_band():
    """Damped: lost above 80 % of the SLO, back only under 60 %; a p90 hovering between keeps the last answer."""
    from baton.worker.router.prefill_failure import MIN_SAMPLES, HeadroomGate

    gate, slo = HeadroomGate(), 0.05
    at = {f: [f * slo] * 20 for f in (0.5, 0.7, 0.79, 0.85)}
    assert gate.check(at[0.7], slo) and gate.check(at[0.79], slo)  # open: stays open below 80 %
    assert not gate.check(at[0.85], slo)  # lost above 80 %
    assert not gate.check(at[0.79], slo) and not gate.check(at[0.7], slo)  # in the band: still no headroom
    assert gate.check(at[0.5], slo)  # back under 60 %: recompute again
    assert gate.check(at[0.7], slo)  # and open again in the band
    assert not gate.check(at[0.85], slo) and gate.check([1.0] * (MIN_SAMPLES - 1), slo)  # no evidence: open
    assert gate.check(at[0.85], None)  # no SLO: nothing to protect
    with pytest.raises(ValueError):
        HeadroomGate(close_at=0.6, reopen_at=0.8)


def test_ttft_stages_add_up_to_the_ttft():
    from baton.worker.router.stages import Hop, ttft_stages

    q, p, k = launch.Timing.QUEUE, launch.Timing.PREFILL, launch.Timing.KV_IMPORT
    # disaggregated: router time before the prefill hop + worker queue, prefill, KV import, the rest
    got = ttft_stages(0.5, Hop(0.01, {q: 0.02, p: 0.2}), Hop(0.25, {q: 0.001, k: 0.05}))
    assert got == pytest.approx({"prefill_queue": 0.03, "prefill_compute": 0.2, "kv_handoff": 0.05,
                                 "first_decode": 0.22})
    assert sum(got.values()) == pytest.approx(0.5, abs=1e-12)
    # recompute on the decode worker (its own queue + prefill); time on the failed prefill hop is queue
    got = ttft_stages(1.0, Hop(0.0, {q: 0.1, p: 0.1}), Hop(0.6, {q: 0.05, p: 0.3}))
    assert got == pytest.approx({"prefill_queue": 0.65, "prefill_compute": 0.3, "first_decode": 0.05})
    # vLLM workers report nothing: only the residual is observed
    assert ttft_stages(0.4, Hop(0.0, {}), Hop(0.3, {})) == {"first_decode": 0.4}
    assert ttft_stages(0.4, None, None) == {"first_decode": 0.4}
    # a worker cannot report more than the router saw pass
    got = ttft_stages(0.1, Hop(0.0, {q: 0.05, p: 0.2}), Hop(0.09, {k: 0.01}))
    assert got == {"prefill_queue": 0.05, "prefill_compute": pytest.approx(0.05), "kv_handoff": 0.0,
                   "first_decode": 0.0}
    assert sum(got.values()) == pytest.approx(0.1)


def test_server_timing_round_trip():
    t = {launch.Timing.QUEUE: 0.000123, launch.Timing.PREFILL: 1.5}
    header = launch.format_server_timing(t)
    assert header == "queue;dur=0.123, prefill;dur=1500.000"
    assert launch.parse_server_timing(header) == pytest.approx(t)
    assert launch.parse_server_timing('cache;desc="hit", db;dur=nan, x;dur=-1, edge;desc=a;dur="2"') == \
        {"edge": 0.002}
    assert launch.parse_server_timing(None) == {}


def test_flags():
    from baton.worker.router.cli import build_config

    from baton.cli import CommandError, build_parser

    def config(*extra: str):
        return build_config(build_parser().parse_args(["router", "--both", "http://w:8000", *extra]))

    assert config().prefill_failure.recompute == "whenHeadroom" and config().prefill_failure.tpot_slo is None
    got = config(launch.Flag.PREFILL_RETRIES, "2", launch.Flag.PREFILL_RECOMPUTE, "never",
                 launch.Flag.PREFILL_RETRY_AFTER, "9", launch.Flag.TPOT_SLO, "0.04").prefill_failure
    assert (got.retries, got.recompute, got.retry_after, got.tpot_slo) == (2, "never", 9, 0.04)
    for bad, words in (((launch.Flag.PREFILL_RETRIES, "-1"), "--prefill-retries"),
                       ((launch.Flag.PREFILL_RETRY_AFTER, "0"), "--prefill-retry-after"),
                       ((launch.Flag.TPOT_SLO, "0"), "--tpot-slo")):
        with pytest.raises(CommandError, match=words):
            config(*bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--both", "http://w:8000", launch.Flag.PREFILL_RECOMPUTE, "maybe"])


# ---------------------------------------------------------------------------------------- over stub workers


def pick(r: RunningRouter, healthy: list[str], url: str) -> None:
    """Only `healthy` prefill endpoints are healthy, and round-robin's next pick among them is `url`."""
    for ep in r.router.pool.endpoints["prefill"].values():
        ep.healthy = ep.url in healthy
    r.router.policy["prefill"].counter = sorted(healthy).index(url)


def _policy(**kw):
    from baton.worker.router.prefill_failure import PrefillFailurePolicy

    return PrefillFailurePolicy(**kw)


def test_a_failing_prefill_worker_is_retried_on_another():
    bad, good, decode = Worker(prefill_500).start(), Worker(prefill_ok).start(), Worker(answer).start()
    dead = dead_url()
    r = RunningRouter(prefill=[bad.base_url, good.base_url, dead], decode=[decode.base_url],
                      policy="round-robin", health_interval=3600,
                      prefill_failure=_policy(retries=2, recompute="never")).start()
    try:
        eps = r.router.pool.endpoints["prefill"]
        pick(r, [bad.base_url, good.base_url], bad.base_url)  # a 500 first
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "good"
        assert (len(bad.bodies), len(good.bodies)) == (1, 1)
        assert decode.bodies[-1]["kv_transfer_params"] == ROUTER_KV  # the retry's KV, not a recompute
        # a dead one first (connection refused): the next one serves, and the dead one is out of rotation
        pick(r, [good.base_url, dead], dead)
        assert httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30).status_code == 200
        m = settled(r)
        assert failures(m, "retried_ok") == 2 and failures(m, "recomputed") == failures(m, "rejected") == 0
        assert outcome(m, "ok") == 2
        assert hop_errors(m, "prefill", "500") == 1 and hop_errors(m, "prefill", "connection") == 1
        assert m[("baton_router_retries_total", (("role", "prefill"),))] == 2
        assert not eps[dead].healthy and len(good.bodies) == 2
    finally:
        r.stop()
        for w in (bad, good, decode):
            w.stop()


def test_retries_are_bounded_then_never_gives_a_fast_503():
    bads = [Worker(prefill_500).start() for _ in range(3)]
    decode = Worker(answer).start()
    r = RunningRouter(prefill=[w.base_url for w in bads], decode=[decode.base_url], health_interval=3600,
                      prefill_failure=_policy(retries=1, recompute="never", retry_after=7)).start()
    try:
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30,
                          headers={"X-Request-Id": "pf-1"})
        assert time.monotonic() - t0 < 10  # answered at once, not after a wait (a bound: CI machines are loaded)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "7"
        assert resp.json()["error"]["code"] == "prefill_unavailable" and resp.headers["X-Request-Id"] == "pf-1"
        assert sum(len(w.bodies) for w in bads) == 2  # the first try + 1 retry, never the third
        assert decode.bodies == []  # no recompute
        m = settled(r)
        assert failures(m, "rejected") == 1 and outcome(m, "rejected") == 1 and outcome(m, "ok") == 0
    finally:
        r.stop()
        for w in (*bads, decode):
            w.stop()


def test_a_prefill_worker_that_never_answers_gives_a_503_not_a_hang():
    sock, url = silent_socket()
    decode = Worker(answer).start()
    r = RunningRouter(prefill=[url], decode=[decode.base_url], health_interval=3600, hop_timeout=0.5,
                      prefill_failure=_policy(recompute="never")).start(ready=False)
    try:
        first(r, "prefill", url)
        first(r, "decode", decode.base_url)
        t0 = time.monotonic()
        resp = httpx.post(r.base_url + "/v1/completions", json={**BODY, "stream": True}, timeout=30)
        took = time.monotonic() - t0
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5" and 0.5 <= took < NOT_A_HANG, took
        m = settled(r)
        assert hop_errors(m, "prefill", "timeout") == 1 and failures(m, "rejected") == 1
    finally:
        r.stop()
        decode.stop()
        sock.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_always_recomputes_on_the_decode_worker(stream):
    bad, decode = Worker(prefill_500).start(), Worker(answer).start()
    r = RunningRouter(prefill=[bad.base_url], decode=[decode.base_url], health_interval=3600,
                      prefill_failure=_policy(recompute="always", tpot_slo=0.001)).start()
    try:
        for _ in range(12):  # TPOTs far above the SLO: `always` recomputes anyway
            r.router.tpot_window.observe(1.0)
        resp = httpx.post(r.base_url + "/v1/completions", json={**BODY, "stream": stream}, timeout=30)
        assert resp.status_code == 200 and ("hi" in resp.text if stream else resp.json()["choices"][0]["text"])
        assert "kv_transfer_params" not in decode.bodies[-1]  # the decode worker computed the prompt
        m = settled(r)
        assert failures(m, "recomputed") == 1 and outcome(m, "fallback_recompute") == 1
    finally:
        r.stop()
        bad.stop()
        decode.stop()


def test_when_headroom_recomputes_only_while_decode_tpot_is_within_the_slo():
    bad, decode = Worker(prefill_500).start(), Worker(answer).start()
    r = RunningRouter(prefill=[bad.base_url], decode=[decode.base_url], health_interval=3600,
                      prefill_failure=_policy(recompute="whenHeadroom", tpot_slo=0.05)).start()
    try:
        for _ in range(20):
            r.router.tpot_window.observe(0.01)  # decode is comfortable
        assert httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30).status_code == 200
        for _ in range(200):
            r.router.tpot_window.observe(0.2)  # decode is past its SLO: a recompute would make it worse
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert "TPOT headroom" in resp.json()["error"]["message"]
        m = settled(r)
        assert failures(m, "recomputed") == 1 and failures(m, "rejected") == 1
        assert len(decode.bodies) == 1
    finally:
        r.stop()
        bad.stop()
        decode.stop()


@pytest.mark.parametrize("prefill", ["unhealthy", "none"])
def test_no_healthy_prefill_worker_is_a_prefill_failure_unless_there_is_no_prefill_tier(prefill):
    sick = Worker(prefill_ok, health_status=503).start()
    decode = Worker(answer).start()
    r = RunningRouter(prefill=[sick.base_url] if prefill == "unhealthy" else [], decode=[decode.base_url],
                      prefill_failure=_policy(recompute="never")).start(ready=False)
    try:
        wait_ready(r)
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30)
        m = settled(r)
        if prefill == "unhealthy":  # the prefill tier is down: the policy says no recompute
            assert resp.status_code == 503 and failures(m, "rejected") == 1 and decode.bodies == []
        else:  # a decode-only fleet: recompute is how it serves, not a failure
            assert resp.status_code == 200 and failures(m, "rejected") == failures(m, "recomputed") == 0
            assert outcome(m, "fallback_recompute") == 1
        assert sick.bodies == []
    finally:
        r.stop()
        sick.stop()
        decode.stop()


def test_a_decode_service_alone_is_a_decode_only_fleet():
    """Kubernetes, `--decode-service` alone (what the operator renders for prefill replicas 0: a colocated
    layout): the decode workers compute the prompts by design -- no prefill-failure policy, even `never`."""
    from kubernetes import client as k8s

    from .test_router_policy import FakeCoreV1

    port_cls = getattr(k8s, "CoreV1EndpointPort", None) or k8s.V1EndpointPort
    decode = Worker(answer).start()
    host, port = decode.base_url.removeprefix("http://").split(":")
    api = FakeCoreV1({"chat-decode": k8s.V1Endpoints(subsets=[k8s.V1EndpointSubset(
        addresses=[k8s.V1EndpointAddress(ip=host)], ports=[port_cls(name="http", port=int(port))])])})
    r = RunningRouter(decode_service="chat-decode", namespace="ml", kube_api=api, discovery_interval=0.2,
                      prefill_failure=_policy(recompute="never")).start(ready=False)
    try:
        wait_ready(r)
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30)
        m = settled(r)
        assert resp.status_code == 200 and outcome(m, "fallback_recompute") == 1 and failures(m, "rejected") == 0
        assert len(decode.bodies) == 1 and "kv_transfer_params" not in decode.bodies[0]
    finally:
        r.stop()
        decode.stop()


def test_a_prefill_service_with_no_ready_pods_is_a_prefill_failure():
    """Kubernetes: the prefill Service's Endpoints list no ready address (every prefill pod crashed): that is the
    prefill tier down, so the policy applies (here `never`: 503), not the decode-only fleet's recompute."""
    from kubernetes import client as k8s

    from .test_router_policy import FakeCoreV1

    port_cls = getattr(k8s, "CoreV1EndpointPort", None) or k8s.V1EndpointPort
    decode = Worker(answer).start()
    host, port = decode.base_url.removeprefix("http://").split(":")
    api = FakeCoreV1({
        "chat-prefill": k8s.V1Endpoints(subsets=[k8s.V1EndpointSubset(
            not_ready_addresses=[k8s.V1EndpointAddress(ip="10.0.0.9")], ports=[port_cls(name="http", port=8000)])]),
        "chat-decode": k8s.V1Endpoints(subsets=[k8s.V1EndpointSubset(
            addresses=[k8s.V1EndpointAddress(ip=host)], ports=[port_cls(name="http", port=int(port))])]),
    })
    r = RunningRouter(prefill_service="chat-prefill", decode_service="chat-decode", namespace="ml", kube_api=api,
                      discovery_interval=0.2, prefill_failure=_policy(recompute="never")).start(ready=False)
    try:
        wait_ready(r)
        assert r.router.pool.endpoints["prefill"] == {}
        resp = httpx.post(r.base_url + "/v1/completions", json=BODY, timeout=30)
        m = settled(r)
        assert resp.status_code == 503 and resp.headers.get("Retry-After") and failures(m, "rejected") == 1
        assert decode.bodies == []
    finally:
        r.stop()
        decode.stop()
