"""`baton worker`: startup errors are one clear line; a real worker process serves and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from baton.worker.local_fleet import free_port, free_ports

# `python -m baton.cli` would make baton.cli `__main__` (a second CommandError class); run it as the script does.
BATON = (sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())")


def baton(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*BATON, *args], capture_output=True, text=True, check=False, timeout=timeout, env=env
    )


def test_help_lists_the_options():
    out = baton("worker", "--help").stdout
    for flag in (
        "--role",
        "--model",
        "--host",
        "--port",
        "--served-model-name",
        "--max-num-seqs",
        "--kv-blocks",
    ):
        assert flag in out


def test_missing_model_is_one_line(tmp_path):
    r = baton("worker", "--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"baton worker: error: model directory {tmp_path / 'nope'} does not exist"
    ]
    assert "Traceback" not in r.stderr


def test_not_a_model_directory(tmp_path):
    r = baton("worker", "--model", str(tmp_path), "--port", str(free_port()))
    assert r.returncode == 1
    assert "has no config.json" in r.stderr and "Traceback" not in r.stderr


def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = baton("worker", "--model", str(tmp_path), "--port", str(port))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("which", ["same", "range", "kv", "busy"])
def test_bad_metrics_port_is_one_line(tmp_path, which):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        metrics, kv = {"same": (port, 0), "range": (70000, 0), "kv": (port + 1, port + 1),
                       "busy": (busy.getsockname()[1], 0)}[which]
        r = baton("worker", "--model", str(tmp_path), "--role", "prefill", "--port", str(port), "--kv-port", str(kv),
                  "--metrics-port", str(metrics))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith("baton worker: error: ") and {
        "same": "is --port too", "range": "is not a port number", "kv": "is --kv-port too",
        "busy": f"cannot listen on 127.0.0.1:{metrics}"}[which] in line, line


def test_bad_role_is_refused_by_argparse(tmp_path):
    r = baton("worker", "--model", str(tmp_path), "--role", "router")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr


@pytest.mark.slow
def test_worker_process_serves_and_stops_on_ctrl_c(tmp_path):
    pytest.importorskip("torch")
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny", size="tiny", arch="llama", seed=0)
    port, metrics_port = free_ports(2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATON_LLMSERVICE": "svc", "BATON_NAMESPACE": "ns"}
    proc = subprocess.Popen(
        [
            *BATON,
            "worker",
            "--model",
            str(model),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--max-num-seqs",
            "4",
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.1)
        r = httpx.post(
            base + "/v1/completions",
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(base + "/metrics").text  # the API port keeps /metrics: the router reads queues there
        assert 'llmservice="svc"' in metrics and 'namespace="ns"' in metrics and 'role="both"' in metrics
        # the metrics port (what Prometheus scrapes, and all its NetworkPolicy opens): /metrics and nothing else
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and 'vllm:generation_tokens_total{' in scraped.text
        assert 'role="both"' in scraped.text
        for path in ("/v1/models", "/ready", "/health"):
            assert httpx.get(f"http://127.0.0.1:{metrics_port}{path}", timeout=10).status_code == 404, path
        refused = httpx.post(f"http://127.0.0.1:{metrics_port}/v1/completions",
                             json={"model": "tiny", "prompt": "Hello", "max_tokens": 3}, timeout=10)
        assert refused.status_code == 404 and "only /metrics" in refused.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
