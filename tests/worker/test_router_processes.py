"""`baton router` over REAL processes: `baton worker --role prefill|decode --kv-transport tcp` (KV moves
between processes over TCP), a colocated `baton worker --role both` for reference, and the `baton router`
command. The official `openai` client through the router gets the colocated worker's answer (greedy),
streaming or not, completions and chat; killing the prefill process makes the router recompute on the
decode worker (still the same answer). Skipped where `baton worker` has no `--kv-transport` yet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from baton.e2e.processes import wait_until_ready
from baton.worker.local_fleet import free_port

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

SERVED = "tiny"
BATON = [sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())"]


def has_kv_transport() -> bool:
    out = subprocess.run(
        [*BATON, "worker", "--help"], check=False, capture_output=True, text=True, timeout=60
    ).stdout
    return "--kv-transport" in out


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def ask(client, chat: bool, prompt: str, stream: bool):
    kw = {"model": SERVED, "max_tokens": 10, "temperature": 0, "stream": stream, "extra_body": {"ignore_eos": True}}
    if chat:
        r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content
    r = client.completions.create(prompt=prompt, **kw)
    if stream:
        return "".join(c.choices[0].text for c in r if c.choices)
    return r.choices[0].text


def start_fleet(model, procs: dict[str, subprocess.Popen], *router_args: str,
                workers: dict[str, tuple[str, list[str]]] | None = None,
                policy: str = "least-loaded") -> tuple[dict[str, str], str]:
    """Real processes: `workers` ({name: (role, extra worker args)}; default a prefill and a decode worker with
    the TCP KV transport and a colocated `both` worker for the expected answers, each named by its role) and a
    router over the prefill and decode ones (`router_args` added); all Ready. The caller kills `procs` (filled as
    they start) in a `finally`. Returns (worker URLs by name, router URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = workers or {role: (role, []) for role in ("prefill", "decode", "both")}
    urls: dict[str, str] = {}
    for name, (role, extra) in workers.items():
        port = free_port()
        kv = ["--kv-transport", "tcp", "--kv-port", "0"] if role != "both" else []
        procs[name] = subprocess.Popen(
            BATON + ["worker", "--role", role, "--model", str(model), "--port", str(port),
                     "--served-model-name", SERVED, "--log-level", "warning", *kv, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        urls[name] = f"http://127.0.0.1:{port}"

    def of(role: str) -> str:
        return ",".join(urls[name] for name, (r, _) in workers.items() if r == role)

    rport = free_port()
    router = f"http://127.0.0.1:{rport}"
    procs["router"] = subprocess.Popen(
        BATON + ["router", "--policy", policy, "--host", "127.0.0.1", "--port", str(rport),
                 "--prefill", of("prefill"), "--decode", of("decode"), "--health-interval", "0.5",
                 "--log-level", "warning", *router_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name in workers:
        wait_until_ready(urls[name], procs[name])
    wait_until_ready(router, procs["router"], timeout=30)
    return urls, router


@pytest.mark.slow
def test_router_over_processes_with_tcp_kv(tmp_path):
    if not has_kv_transport():
        pytest.skip("baton worker has no --kv-transport (TCP KV transport not available)")
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny", size="tiny", arch="llama", seed=0)
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls, router = start_fleet(model, procs)

        direct = openai.OpenAI(base_url=urls["both"] + "/v1", api_key="x", max_retries=0, timeout=60)
        routed = openai.OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=60)
        for chat in (False, True):
            want = ask(direct, chat, "Where do the rivers go?", stream=False)
            for stream in (False, True):
                assert ask(routed, chat, "Where do the rivers go?", stream) == want, (chat, stream)
        assert metric(router, "baton_router_requests_total", outcome="ok") == 4
        assert metric(router, "baton_router_requests_total", outcome="fallback_recompute") == 0
        assert metric(urls["prefill"], "vllm:num_requests_running") == 0
        assert metric(urls["decode"], "vllm:num_requests_running") == 0

        procs["prefill"].send_signal(signal.SIGKILL)  # the router recomputes on the decode worker
        procs["prefill"].wait()
        want = ask(direct, True, "And then?", stream=False)
        assert ask(routed, True, "And then?", stream=True) == want
        assert ask(routed, True, "And then?", stream=False) == want
        assert metric(router, "baton_router_requests_total", outcome="fallback_recompute") == 2
        procs["router"].send_signal(signal.SIGTERM)
        assert procs["router"].wait(timeout=15) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
