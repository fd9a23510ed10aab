"""The router's prefix-aware policy and the workers' prefix cache, together, over real processes: requests
sharing a long prompt prefix go to one worker, which answers them from its cache -- seen in the workers'
`vllm:prefix_cache_hits` and in the TTFT the client measures."""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import time

import pytest
from baton.e2e.processes import wait_until_ready

from .test_router_processes import BATON, SERVED, free_port, metric

openai = pytest.importorskip("openai")

WORDS = ["river", "mountain", "cloud", "engine", "batch", "token", "prefill", "decode", "cache", "lease", "worker", "router", "service", "planner", "kernel", "tensor", "layer", "block", "stream", "request", "answer", "question", "model"]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _ttft(client, prompt: str) -> float:
    t0 = time.perf_counter()
    stream = client.completions.create(model=SERVED, prompt=prompt, max_tokens=2, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
            break
    for _ in stream:
        pass
    return ttft


@pytest.mark.slow
@pytest.mark.integration
def test_prefix_aware_routing_hits_the_cache(tmp_path):
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny", size="tiny", arch="llama", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    workers = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen(
                BATON + ["worker", "--model", str(model), "--port", str(port), "--served-model-name", SERVED,
                         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
            workers.append(f"http://127.0.0.1:{port}")
        rport = free_port()
        router = f"http://127.0.0.1:{rport}"
        procs.append(subprocess.Popen(
            BATON + ["router", "--policy", "prefix-aware", "--host", "127.0.0.1", "--port", str(rport),
                     "--both", ",".join(workers), "--health-interval", "0.5", "--log-level", "warning"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for url, p in zip(workers, procs):
            wait_until_ready(url, p)
        wait_until_ready(router, procs[-1], timeout=30)
        client = openai.OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=60)
        rng = random.Random(0)
        _ttft(client, _text(rng, 20))  # warm-up
        hits0 = [metric(w, "vllm:prefix_cache_hits_total") for w in workers]
        shared = _text(rng, 200)  # ~700 tokens, the same first characters: one routing key
        cold, warm = [], []
        for i in range(8):
            cold.append(_ttft(client, _text(rng, 200) + " " + _text(rng, 8)))  # a new prefix every time
        for i in range(8):  # back to back: round-robin would spread them over both workers
            warm.append(_ttft(client, shared + " " + _text(rng, 8)))  # the same prefix (cold only the 1st time)
        hits = [metric(w, "vllm:prefix_cache_hits_total") - h for w, h in zip(workers, hits0)]
        queries = sum(metric(w, "vllm:prefix_cache_queries_total") for w in workers)
        ratio = statistics.median(cold) / statistics.median(warm[1:])
        print(f"\nTTFT through the router: cold median {1000 * statistics.median(cold):.1f} ms, shared-prefix "
              f"median {1000 * statistics.median(warm[1:]):.1f} ms ({ratio:.2f}x); hit tokens per worker {hits} "
              f"of {queries:.0f} queried")
        # all 7 repeats of the shared prefix went to the worker that cached it (the other got no hit from it)
        assert max(hits) >= 7 * 400 and min(hits) < 400, hits
        # the TTFT ratio is printed, not asserted: a timing on a shared 2-core machine is not a test verdict (one
        # run under load gave 0.74x, quiet runs 2.4-3.4x); benchmarks/prefix_cache.py measures it properly
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
