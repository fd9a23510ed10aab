"""A rollout that changes the KV layout, in miniature, over REAL processes (issue 23): an "old" prefill worker
with `--block-size 8`, a "new" prefill worker and a decode worker with the default 16 (TCP KV transport), a
colocated `both` worker for the expected greedy answers, and the `baton router` command. The router reads each
worker's KV-layout fingerprint from its /ready body and hands KV only between equal ones: every prefill hop goes
to the new prefill worker, never the old one (its KV would not fit the decode worker's blocks); once the new
prefill worker is gone, requests are recomputed on the decode worker instead. Answers equal the colocated
worker's throughout, and `baton_router_kv_handoffs_total{match="cross"}` stays 0. (The real-node rollout --
pods of two LLMService revisions -- is not covered here.)"""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from baton import launch

from .test_router_processes import ask, has_kv_transport, metric, start_fleet

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

PROMPT = "Where do the rivers go?"


@pytest.mark.slow
def test_prefill_and_decode_pair_only_by_kv_layout(tiny_model_dir):
    if not has_kv_transport():
        pytest.skip("baton worker has no --kv-transport (TCP KV transport not available)")
    workers = {  # name: (role, extra args)
        "prefill_old": ("prefill", [launch.Flag.BLOCK_SIZE, "8", "--dtype", "float32"]),
        "prefill_new": ("prefill", ["--dtype", "float32"]),
        "decode": ("decode", ["--dtype", "float32"]),
        "both": ("both", ["--dtype", "float32"]),
    }
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls, router = start_fleet(tiny_model_dir, procs, workers=workers, policy="round-robin")

        fingerprints = {n: httpx.get(urls[n] + "/ready").json()[launch.READY_KV_FINGERPRINT] for n in workers}
        assert fingerprints["prefill_new"] == fingerprints["decode"] == fingerprints["both"]
        assert fingerprints["prefill_old"] != fingerprints["decode"]

        direct = openai.OpenAI(base_url=urls["both"] + "/v1", api_key="x", max_retries=0, timeout=60)
        routed = openai.OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=60)
        handoffs = launch.Metric.ROUTER_KV_HANDOFFS
        n = 0
        for chat in (False, True):
            want = ask(direct, chat, PROMPT, stream=False)
            for stream in (False, True):
                assert ask(routed, chat, PROMPT, stream) == want, (chat, stream)
                n += 1
        assert metric(router, handoffs, match="same") == n
        assert metric(router, handoffs, match="cross") == 0
        assert metric(router, "baton_router_requests_total", outcome="ok") == n
        assert metric(urls["prefill_old"], "vllm:request_prompt_tokens_count") == 0  # never chosen
        assert metric(urls["prefill_new"], "vllm:request_prompt_tokens_count") == n

        procs["prefill_new"].send_signal(signal.SIGKILL)  # only the old layout's prefill left: recompute
        procs["prefill_new"].wait()
        deadline = time.monotonic() + 10  # the router's health checks see it gone (a refused connection)
        while httpx.get(router + "/ready").json()["workers"]["prefill"]["healthy"] != 1:
            assert time.monotonic() < deadline, "the router still counts the killed prefill worker healthy"
            time.sleep(0.1)
        want = ask(direct, True, "And then?", stream=False)
        assert ask(routed, True, "And then?", stream=True) == want
        assert ask(routed, True, "And then?", stream=False) == want
        assert metric(router, handoffs, match="cross") == 0
        assert metric(router, launch.Metric.ROUTER_LAYOUT_MISMATCH) == 2
        assert metric(router, "baton_router_requests_total", outcome="fallback_recompute") == 2
        assert metric(urls["prefill_old"], "vllm:request_prompt_tokens_count") == 0
        procs["router"].send_signal(signal.SIGTERM)
        assert procs["router"].wait(timeout=15) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
