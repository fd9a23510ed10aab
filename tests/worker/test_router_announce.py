"""`baton router --kv-announce`: the prefill hop streams, the decode hop starts on the prefill worker's KV
announcement (before the prefill's forward ends), and the client gets what a colocated worker gives."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from baton.worker.router.announce import SSEEvents, announced_kv
from baton.worker.router.metrics import OUTCOMES

from baton.launch import KV_ANNOUNCE

from .test_router_processes import SERVED, ask, metric, start_fleet

openai = pytest.importorskip("openai")


def test_sse_events_and_announcement_parsing():
    ev = SSEEvents()
    assert ev.feed(b'data: {"choices": [], "kv_transfer_params": {"a": 1}}\n') == []  # not complete yet
    assert ev.feed(b"\ndata: [DO") == ['{"choices": [], "kv_transfer_params": {"a": 1}}']
    assert ev.feed(b"NE]\r\n\r\n") == ["[DONE]"]
    assert announced_kv('{"choices": [], "kv_transfer_params": {"a": 1}}') == ({"a": 1}, None)
    assert announced_kv('{"choices": [{"text": "x"}]}') == (None, None)
    assert announced_kv('{"error": {"message": "boom"}}') == (None, "boom")
    assert announced_kv("[DONE]")[1] is not None
    assert announced_kv("not json") == (None, None)


@pytest.mark.slow
@pytest.mark.integration
def test_router_starts_decode_on_the_announcement(tmp_path):
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny", size="tiny", arch="llama", seed=0)
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls, router = start_fleet(model, procs, "--kv-announce")
        direct = openai.OpenAI(base_url=urls["both"] + "/v1", api_key="x", max_retries=0, timeout=60)
        routed = openai.OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=60)
        prompt = "The relay passes the baton from the prefill runner to the decode runner " * 4
        for chat in (False, True):
            want = ask(direct, chat, prompt, stream=False)
            for stream in (False, True):
                assert ask(routed, chat, prompt, stream) == want, (chat, stream)
        outcomes = {o: metric(router, "baton_router_requests_total", outcome=o) for o in OUTCOMES}
        assert outcomes["ok"] == 4, outcomes  # none recomputed: all 4 handed off (the fleet waited for the
        # router to see the prefill worker healthy: `wait_until_ready`)
        assert metric(urls["decode"], "baton_kv_transfer_seconds_count") == 4  # every KV came from the prefill worker
        # what the router reads: the prefill worker's first SSE event is the announcement, before any token
        body = {"model": SERVED, "prompt": prompt, "max_tokens": 1, "stream": True,
                "kv_transfer_params": {"do_remote_decode": True, KV_ANNOUNCE: True}}
        with httpx.stream("POST", urls["prefill"] + "/v1/completions", json=body, timeout=60) as r:
            events = [e for line in r.iter_lines() if line.startswith("data:") for e in [line[5:].strip()]]
        first = json.loads(events[0])
        assert first["choices"] == [] and "first_token_ids" not in first["kv_transfer_params"]
        assert any("first_token_ids" in (json.loads(e).get("kv_transfer_params") or {})
                   for e in events[1:] if e != "[DONE]")  # the final chunk still carries vLLM's full params
        # the prefill streams were drained: nothing left in flight at either worker
        assert metric(urls["prefill"], "vllm:num_requests_running") == 0
        assert metric(router, "baton_router_inflight", role="prefill", endpoint=urls["prefill"]) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
