"""The router's end-to-end TTFT (`baton_router_ttft_seconds`, issue 22): bucketed exactly as vLLM's
`vllm:time_to_first_token_seconds`, and one observation per request that spans the whole disaggregated path --
the prefill hop, the KV hand-off and the decode worker's first token -- as the client sees it.

vLLM's buckets are read from vLLM's own source in `.venv-vllm` (not imported: that takes seconds); without that
virtualenv the comparison with vLLM is skipped, saying why, and the router is still checked against
`launch.VLLM_TTFT_BUCKETS`.

The request test runs a real prefill and a real decode Baton worker in this process behind the router's app
(helpers from test_router.py), with the prefill hop and the KV pull each made slower by a known delay (a slow
prefill worker, a slow KV link): the one TTFT the router observes must hold both, and no more than the client
saw.
"""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import httpx
import pytest

from baton import launch

pytest.importorskip("torch")

from .test_router import SERVED, RunningRouter, serve_roles, settled

REPO = Path(__file__).resolve().parents[2]
TTFT = launch.Metric.ROUTER_TTFT
#: added to the prefill hop (before the prefill worker's engine sees the request) and to the KV pull
PREFILL_DELAY = 0.2
KV_DELAY = 0.3


def vllm_package() -> Path | None:
    return next(iter(sorted(REPO.glob(".venv-vllm/lib/python3*/site-packages/vllm"))), None)


def vllm_ttft_buckets(vllm: Path) -> tuple[float, ...]:
    """The buckets vLLM gives `vllm:time_to_first_token_seconds`, read from its source: the `time_to_first_token`
    family's default in vllm/v1/metrics/buckets.py (recent vLLM), else the literal in the Histogram call."""
    loggers = (vllm / "v1" / "metrics" / "loggers.py").read_text()
    assert '"vllm:time_to_first_token_seconds"' in loggers
    family = vllm / "v1" / "metrics" / "buckets.py"
    if family.exists():
        assert 'histogram_buckets(\n            "time_to_first_token"' in loggers or \
            'histogram_buckets("time_to_first_token"' in loggers, "vLLM's TTFT histogram no longer uses its family"
        for node in ast.parse(family.read_text()).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "TIME_TO_FIRST_TOKEN_BUCKETS":
                return tuple(float(b) for b in ast.literal_eval(node.value))
        raise AssertionError(f"no TIME_TO_FIRST_TOKEN_BUCKETS in {family}")
    for node in ast.walk(ast.parse(loggers)):
        if isinstance(node, ast.Call):
            kw = {k.arg: k.value for k in node.keywords}
            name = kw.get("name")
            if isinstance(name, ast.Constant) and name.value == "vllm:time_to_first_token_seconds":
                return tuple(float(b) for b in ast.literal_eval(kw["buckets"]))
    raise AssertionError(f"vllm:time_to_first_token_seconds not found in {vllm}")


def exported_bounds(metrics: dict) -> list[float]:
    return sorted(float(dict(labels)["le"]) for (name, labels) in metrics if name == f"{TTFT}_bucket")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-ttft"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def workers(model):
    yield from serve_roles(model, SERVED, {"prefill": "prefill", "decode": "decode"}, labelled=False)


@pytest.fixture
def router(workers):
    r = RunningRouter(prefill=[workers["prefill"].base_url], decode=[workers["decode"].base_url]).start()
    yield r
    r.stop()


def test_the_router_exports_vllms_ttft_buckets(router):
    bounds = exported_bounds(router.metrics())
    assert bounds == [*launch.VLLM_TTFT_BUCKETS, float("inf")]
    vllm = vllm_package()
    if vllm is None:
        pytest.skip("no .venv-vllm here (scripts/setup vllm makes it): the router's buckets were checked against "
                    "launch.VLLM_TTFT_BUCKETS only, not against vLLM's own definition")
    assert bounds == [*vllm_ttft_buckets(vllm), float("inf")]


@pytest.fixture
def slow_hops(workers, monkeypatch):
    """A prefill worker that takes PREFILL_DELAY longer to answer, and a KV pull that takes KV_DELAY longer."""
    prefill = workers["prefill"].engine
    generate = prefill.generate

    async def slow_generate(request):
        await asyncio.sleep(PREFILL_DELAY)
        async for out in generate(request):
            yield out

    monkeypatch.setattr(prefill, "generate", slow_generate)
    transport = workers["decode"].engine.kv_transport
    pull = transport.pull

    async def slow_pull(params, sink):
        await asyncio.sleep(KV_DELAY)
        return await pull(params, sink)

    monkeypatch.setattr(transport, "pull", slow_pull)


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_one_request_is_one_ttft_observation_that_holds_the_kv_handoff(workers, router, slow_hops, stream):
    body = {"model": SERVED, "prompt": "Where do the rivers go?", "max_tokens": 4, "temperature": 0,
            "stream": stream, "ignore_eos": True}
    start = time.monotonic()
    with httpx.stream("POST", router.base_url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        client_ttft = None
        for line in resp.iter_lines():
            if client_ttft is None and line.startswith(("data: {", "{")) and '"text":"' in line.replace(" ", "") \
                    and '"text":""' not in line.replace(" ", ""):
                client_ttft = time.monotonic() - start
    assert client_ttft is not None
    m = settled(router)

    assert m[(f"{TTFT}_count", ())] == 1  # exactly one observation for the request
    ttft = m[(f"{TTFT}_sum", ())]
    # the KV was handed over (no recompute), and the KV pull, as long as the slow link made it, is in the TTFT
    assert m[("baton_router_requests_total", (("outcome", "ok"),))] == 1
    handoff = m[(f"{launch.Metric.ROUTER_TTFT_STAGE}_sum", (("stage", "kv_handoff"),))]
    assert handoff >= KV_DELAY
    assert ttft >= PREFILL_DELAY + handoff  # the prefill hop before it, the hand-off itself
    assert ttft <= client_ttft  # and nothing the client did not wait for
    # the one observation sits in every bucket from the first bound at or above it
    for bound in launch.VLLM_TTFT_BUCKETS:
        assert m[(f"{TTFT}_bucket", (("le", str(bound)),))] == (1 if ttft <= bound else 0), bound

