"""TTFT stages and the prefill-failure policy with REAL workers on the tiny model (prefill and decode Baton
workers in this process, the router's aiohttp app in a thread; helpers from test_router.py):

- the workers report their part in `Server-Timing` (prefill: queue + prefill; decode pulling the KV: queue +
  kv_import; colocated: queue + prefill), and for a disaggregated request every stage of
  `baton_router_ttft_stage_seconds` is observed, > 0, and the stages add up to the request's TTFT;
- a prefill worker that died (the router still thinks it healthy) -> the request is retried on the other
  prefill worker and the answer is the colocated worker's;
- policy `always` with every prefill worker dead -> the decode worker recomputes (same answer).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from baton import launch

pytest.importorskip("torch")

from .test_router import (
    SERVED,
    RunningRouter,
    RunningServer,
    ask,
    dead_url,
    hop_errors,
    make_engine,
    outcome,
    serve_roles,
    settled,
    stream_text,
    text_of,
    wait_idle,
)

STAGE = launch.Metric.ROUTER_TTFT_STAGE


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-stages"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def workers(model):
    roles = {"both": "both", "prefill": "prefill", "prefill2": "prefill", "decode": "decode"}
    yield from serve_roles(model, SERVED, roles, labelled=False)


def stage_sums(m: dict) -> dict[str, tuple[float, float]]:
    """{stage: (count, sum)} of the stage histogram."""
    return {s: (m.get((f"{STAGE}_count", (("stage", s),)), 0.0), m.get((f"{STAGE}_sum", (("stage", s),)), 0.0))
            for s in launch.TTFT_STAGES}


def test_workers_report_their_part_in_server_timing(workers):
    body = {"model": SERVED, "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0}
    both = httpx.post(workers["both"].base_url + "/v1/completions", json=body, timeout=60)
    assert set(launch.parse_server_timing(both.headers.get("Server-Timing"))) == {"queue", "prefill"}
    hop = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    prefill = httpx.post(workers["prefill"].base_url + "/v1/completions", json=hop, timeout=60)
    timings = launch.parse_server_timing(prefill.headers.get("Server-Timing"))
    assert set(timings) == {"queue", "prefill"} and timings["prefill"] > 0 and timings["queue"] >= 0
    decode_body = {**body, "stream": True, "kv_transfer_params": prefill.json()["kv_transfer_params"]}
    with httpx.stream("POST", workers["decode"].base_url + "/v1/completions", json=decode_body, timeout=60) as r:
        timings = launch.parse_server_timing(r.headers.get("Server-Timing"))  # with the first chunk
        r.read()
    assert set(timings) == {"queue", "kv_import"} and timings["kv_import"] > 0


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_stages_of_a_disaggregated_request_are_positive_and_add_up_to_its_ttft(workers, stream):
    r = RunningRouter(prefill=[workers["prefill"].base_url], decode=[workers["decode"].base_url]).start()
    try:
        got = ask(r.client(), False, "Where do the rivers go?", stream=stream, max_tokens=6)
        assert (stream_text(list(got), False) if stream else text_of(got, False))
        m = settled(r)
        assert outcome(m, "ok") == 1
        stages = stage_sums(m)
        ttft = m[("baton_router_ttft_seconds_sum", ())]
        assert m[("baton_router_ttft_seconds_count", ())] == 1
        assert all(count == 1 for count, _ in stages.values()), stages
        assert all(seconds > 0 for _, seconds in stages.values()), stages
        assert sum(seconds for _, seconds in stages.values()) == pytest.approx(ttft, rel=1e-9, abs=1e-9)
        # the reported stages are what the workers measured: well below the TTFT, not the residual
        assert stages["prefill_compute"][1] < ttft and stages["kv_handoff"][1] < ttft
    finally:
        r.stop()


def test_a_dead_prefill_worker_is_retried_on_the_other(workers, model):
    from baton.worker.server import create_app

    engine = make_engine(model, role="prefill")
    doomed = RunningServer(create_app(engine, served_model_name=SERVED), engine)
    doomed.start()
    r = RunningRouter(prefill=[doomed.base_url, workers["prefill2"].base_url], decode=[workers["decode"].base_url],
                      policy="round-robin", health_interval=3600).start()
    try:
        doomed.stop()  # the router still believes it healthy
        r.router.policy["prefill"].counter = sorted([doomed.base_url, workers["prefill2"].base_url]).index(
            doomed.base_url)
        want = text_of(ask(workers["both"].client(), True, "What is the capital?", stream=False), True)
        got = ask(r.client(), True, "What is the capital?", stream=True)
        assert stream_text(list(got), True) == want
        m = settled(r)
        assert m[(launch.Metric.ROUTER_PREFILL_FAILURES, (("outcome", "retried_ok"),))] == 1
        assert outcome(m, "ok") == 1 and outcome(m, "fallback_recompute") == 0  # the KV came from prefill2
        assert all(count == 1 for count, _ in stage_sums(m).values())
    finally:
        r.stop()
    wait_idle(workers["decode"].engine)


@pytest.mark.parametrize("recompute", ["always", "never"])
def test_every_prefill_worker_dead(workers, recompute):
    from baton.worker.router.prefill_failure import PrefillFailurePolicy

    dead = [dead_url(), dead_url()]
    r = RunningRouter(prefill=dead, decode=[workers["decode"].base_url], health_interval=3600,
                      prefill_failure=PrefillFailurePolicy(recompute=recompute)).start(ready=False)
    try:
        for ep in r.router.pool.all():  # all looked healthy at the last check
            ep.healthy = True
        if recompute == "always":
            want = text_of(ask(workers["both"].client(), False, "Tell me a story", stream=False), False)
            assert text_of(ask(r.client(), False, "Tell me a story", stream=False), False) == want
        else:
            resp = httpx.post(r.base_url + "/v1/completions", json={"model": SERVED, "prompt": "x"}, timeout=30)
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        m = settled(r)
        outcome_name = {"always": "recomputed", "never": "rejected"}[recompute]
        assert m[(launch.Metric.ROUTER_PREFILL_FAILURES, (("outcome", outcome_name),))] == 1
        assert hop_errors(m, "prefill", "connection") == 2  # tried both (retries: 1)
        if recompute == "always":  # the decode worker computed the prompt: its queue + prefill are the stages
            assert outcome(m, "fallback_recompute") == 1
            stages = stage_sums(m)
            assert stages["kv_handoff"][0] == 0 and stages["prefill_compute"][1] > 0
            assert sum(s for _, s in stages.values()) == pytest.approx(m[("baton_router_ttft_seconds_sum", ())])
    finally:
        r.stop()
    wait_idle(workers["decode"].engine)
