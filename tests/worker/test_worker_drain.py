"""SIGTERM drains a `baton worker`: out of rotation at once, in-flight streams finish, then exit 0.

Kubernetes sends SIGTERM when it scales a worker Deployment down and SIGKILLs after the pod's grace period
(launch.termination_grace_seconds, rendered by the operator); the drain must fit inside it. The decisions of `DrainingServer` are
checked with a hand-stepped clock; a real worker process checks the whole path (signal, /ready, the stream).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from baton.e2e.processes import wait_until_ready
from baton.worker.local_fleet import free_port
from baton.worker.serve_cli import DEFAULT_DRAIN_TIMEOUT_SECONDS
from baton.worker.server import DRAIN_ACCEPT_SECONDS, DRAIN_CUT_SECONDS, DrainingServer

from baton import launch

BATON = str(Path(sys.executable).parent / "baton")
MAX_TOKENS = 1000  # the tiny model's context is 1024


# ------------------------------------------------------------------------------------------------ decisions


class FakeApp:
    draining = False
    leases = 0
    pulled = 0
    expired = 0

    def begin_drain(self) -> None:
        self.draining = True

    def kv_leases(self) -> int:
        return self.leases

    def kv_lease_outcomes(self) -> tuple[int, int]:
        return self.pulled, self.expired


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def draining_server(drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_SECONDS) -> tuple[DrainingServer, FakeApp, Clock]:
    app = FakeApp()
    server = DrainingServer(uvicorn.Config(app=lambda scope, receive, send: None), app, drain_timeout)
    server.clock = clock = Clock()
    return server, app, clock


def tick(server: DrainingServer, clock: Clock, at: float) -> bool:
    clock.now = server.drain_started + at
    server._drain_tick()
    return server.should_exit


def test_the_default_drain_fits_in_the_pods_grace_period():
    assert DRAIN_ACCEPT_SECONDS < DEFAULT_DRAIN_TIMEOUT_SECONDS == launch.drain_timeout_seconds("decode")
    for role in ("prefill", "decode", "both"):
        w = launch.with_drain(launch.WorkerLaunch(engine="baton", role=role, model_path="/m", served_model_name="m"))
        assert w.drain_timeout + 5 <= launch.termination_grace_seconds(w)


def test_a_prefill_drain_outlasts_a_lease_handed_out_at_the_end_of_the_accept_window():
    """The last prefill a draining worker may still run starts by the end of the accept window plus its queue; its
    lease must end -- pulled or expired -- before the drain timeout, and that before the SIGKILL."""
    for lease in (launch.KV_LEASE_SECONDS, 5.0, 300.0):
        w = launch.with_drain(launch.WorkerLaunch(engine="baton", role="prefill", model_path="/m", served_model_name="m",
                                                  extra_args=(launch.Flag.KV_LEASE_SECONDS, f"{lease:g}")))
        assert w.kv_lease_seconds == lease
        assert w.drain_timeout >= launch.DRAIN_ACCEPT_SECONDS + launch.PREFILL_DRAIN_QUEUE_SECONDS + lease
        assert launch.termination_grace_seconds(w) >= w.drain_timeout + launch.GRACE_SLACK_SECONDS


def test_the_worker_defaults_are_the_rendered_budget(tmp_path):
    """A worker started without the flags drains exactly as the rendered pod expects."""
    from baton.worker.serve_cli import add_worker_command

    parser = argparse.ArgumentParser()
    add_worker_command(parser.add_subparsers())
    args = parser.parse_args(["worker", "--role", "prefill", "--model", str(tmp_path)])
    assert args.kv_lease_seconds == launch.KV_LEASE_SECONDS and args.drain_timeout is None  # filled in by role
    rendered = launch.worker_argv(launch.with_drain(launch.WorkerLaunch(
        engine="baton", role="prefill", model_path=str(tmp_path), served_model_name="m")))
    parsed = parser.parse_args(rendered[1:])
    assert parsed.drain_timeout == launch.drain_timeout_seconds("prefill") == 60
    assert parsed.kv_lease_seconds == launch.KV_LEASE_SECONDS


def test_the_option_and_its_default_are_in_the_help(tmp_path):
    out = subprocess.run([BATON, "worker", "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    assert "--drain-timeout" in out and f"{DEFAULT_DRAIN_TIMEOUT_SECONDS:.0f}" in out and "--kv-lease-seconds" in out
    bad = subprocess.run([BATON, "worker", "--model", str(tmp_path), "--drain-timeout", "-1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "--drain-timeout must be at least 0" in bad.stderr


def test_sigterm_leaves_rotation_at_once_and_exits_when_idle_after_the_accept_window():
    server, app, clock = draining_server()
    server.handle_exit(signal.SIGTERM, None)
    assert app.draining and not server.should_exit  # /ready is 503 before the next tick
    assert not tick(server, clock, 0.0)
    assert not tick(server, clock, DRAIN_ACCEPT_SECONDS - 0.1)  # idle, but endpoints may still send work
    assert tick(server, clock, DRAIN_ACCEPT_SECONDS)
    assert not server.forced and not server.force_exit


def test_requests_in_flight_keep_the_worker_up_past_the_accept_window():
    server, _, clock = draining_server()
    stream = object()
    server.server_state.tasks.add(stream)  # uvicorn's task for a streaming response
    server.handle_exit(signal.SIGTERM, None)
    assert not tick(server, clock, DRAIN_ACCEPT_SECONDS + 60)
    server.server_state.tasks.discard(stream)
    assert tick(server, clock, DRAIN_ACCEPT_SECONDS + 60.1)
    assert server.config.timeout_graceful_shutdown != DRAIN_CUT_SECONDS


def test_kv_caches_not_yet_pulled_keep_a_prefill_worker_up():
    """A prefill worker's HTTP response is done before the decode worker pulls the KV cache it left behind."""
    server, app, clock = draining_server()
    app.leases = 1
    server.handle_exit(signal.SIGTERM, None)
    assert not tick(server, clock, DRAIN_ACCEPT_SECONDS + 10)
    app.leases = 0
    assert tick(server, clock, DRAIN_ACCEPT_SECONDS + 10.1)


def test_the_drain_reports_how_its_leases_ended(caplog):
    server, app, clock = draining_server()
    app.pulled, app.expired, app.leases = 7, 1, 2  # before the drain: not the drain's
    server.handle_exit(signal.SIGTERM, None)
    with caplog.at_level("INFO", logger="baton.worker.server"):
        assert not tick(server, clock, 1.0)
        app.pulled, app.leases = 9, 0
        assert tick(server, clock, DRAIN_ACCEPT_SECONDS)
    assert "KV leases during the drain: 2 pulled, 0 expired" in caplog.text, caplog.text


def test_the_drain_timeout_cuts_what_is_left():
    server, _, clock = draining_server(drain_timeout=20)
    server.server_state.tasks.add(object())
    server.handle_exit(signal.SIGTERM, None)
    assert not tick(server, clock, 19.9)
    assert tick(server, clock, 20.0)
    assert server.config.timeout_graceful_shutdown == DRAIN_CUT_SECONDS
    assert not server.forced


def test_drain_timeout_zero_stops_at_once():
    server, _, clock = draining_server(drain_timeout=0)
    server.handle_exit(signal.SIGTERM, None)
    assert tick(server, clock, 0.0)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_forces_the_exit(second):
    server, _, _ = draining_server()
    server.server_state.tasks.add(object())
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(second, None)
    assert server.forced and server.force_exit and server.should_exit
    assert server.cut_requests == 1


def test_ctrl_c_alone_is_uvicorns_graceful_shutdown():
    server, app, _ = draining_server()
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not app.draining and not server.forced and server.drain_started is None


# ------------------------------------------------------------------------------------------------ a real worker


@contextlib.contextmanager
def worker(model: Path, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`baton worker` as Kubernetes runs it; its log in `log`; killed if a test leaves it running."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [BATON, "worker", "--model", str(model), "--port", str(port), "--served-model-name", "tiny", *args],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_body() -> dict:
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def data_events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def ready_status(base: str) -> tuple[int, dict]:
    r = httpx.get(base + "/ready", timeout=5)
    return r.status_code, r.json()


@pytest.mark.slow
def test_sigterm_lets_a_long_stream_finish_then_exits_0(tiny_model_dir, tmp_path):
    log = tmp_path / "worker.log"
    with worker(tiny_model_dir, log) as (proc, base):
        with httpx.stream("POST", base + "/v1/completions", json=stream_body(), timeout=120) as response:
            assert response.status_code == 200
            events = data_events(response.iter_lines())
            received = [next(events) for _ in range(3)]  # mid-stream

            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while (status := ready_status(base))[0] != 503:
                assert time.monotonic() < deadline, f"/ready still answers {status}"
                time.sleep(0.05)
            assert status[1]["error"]["code"] == "not_ready" and "draining" in status[1]["error"]["message"]
            assert proc.poll() is None and "[DONE]" not in received  # the stream is still going

            # Endpoints propagate slowly: a request that still arrives is served.
            late = httpx.post(base + "/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
            assert late.status_code == 200, late.text
            assert httpx.get(base + "/health", timeout=5).status_code == 200  # alive: no restart, please

            received += list(events)
        assert received[-1] == "[DONE]"
        chunks = [json.loads(e) for e in received[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS  # every token arrived
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "SIGTERM: draining; /ready answers 503, 1 requests in flight" in text, text
    assert "drained in" in text and "drain finished; worker stopped" in text, text
    assert "Traceback" not in text, text


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(tiny_model_dir, tmp_path):
    log = tmp_path / "worker.log"
    with worker(tiny_model_dir, log) as (proc, base):
        with httpx.stream("POST", base + "/v1/completions", json=stream_body(), timeout=120) as response:
            events = data_events(response.iter_lines())
            next(events)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # draining: the accept window alone lasts DRAIN_ACCEPT_SECONDS
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        # Told by what happened, not by a clock (a loaded CI machine took 4.3 s to tear a worker process down):
        # a drain ends with exit status 0 after the accept window; the second signal's path exits 1 and says so
        assert rc == 1
    text = log.read_text()
    assert "stopped at once by a second signal" in text, text


# ------------------------------------------------------------------------------------------------ KV leases


async def test_lease_outcomes_are_metrics_pulled_and_expired(tiny_model_dir):
    """`baton_kv_leases` (held now) and `baton_kv_leases_ended_total{outcome}`: a pulled lease and an expired one."""
    import asyncio

    from baton.worker.engine.engine import BatonEngine
    from baton.worker.engine.types import GenerationRequest, SamplingParams
    from baton.worker.kv.inprocess import InProcessKVTransport, InProcessRegistry
    from baton.worker.metrics import WorkerMetrics

    registry = InProcessRegistry()
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry),
                           kv_lease_seconds=0.3)
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=InProcessKVTransport(registry))
    metrics = WorkerMetrics(model_name="tiny", role="prefill", stats=pre.stats)

    def scrape() -> dict[str, float]:
        out = {}
        for line in metrics.render().decode().splitlines():
            if line.startswith(launch.Metric.KV_LEASES):
                name, value = line.rsplit(" ", 1)
                outcome = re.search(r'outcome="([^"]*)"', name)
                out[name.split("{")[0] + (f"/{outcome[1]}" if outcome else "")] = float(value)
        return out

    async def prefill(rid: str) -> dict:
        ids = pre.tokenizer.encode(f"The baton passes {rid}")
        outs = [o async for o in pre.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=1)))]
        return ids, outs[-1].kv_transfer_params

    ended = launch.Metric.KV_LEASES_ENDED + "_total"
    async with pre, dec:
        for rid in ("pulled-1", "pulled-2"):
            ids, kv = await prefill(rid)
            assert scrape()[launch.Metric.KV_LEASES] == 1
            outs = [o async for o in dec.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=3),
                                                                    kv_transfer_params=kv))]
            assert outs[-1].finished
        await asyncio.sleep(0.05)
        _, _ = await prefill("expired")
        await asyncio.sleep(0.6)  # nobody pulls it
        got = scrape()
    assert got == {launch.Metric.KV_LEASES: 0, f"{ended}/{launch.LEASE_PULLED}": 2,
                   f"{ended}/{launch.LEASE_EXPIRED}": 1}, got


def _post(base: str, body: dict) -> dict:
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_a_draining_prefill_worker_serves_its_kv_until_pulled(tiny_model_dir, tmp_path):
    """The prefill worker gets SIGTERM right after handing out a KV lease: past the accept window it is still up
    (the lease is not pulled), the decode worker pulls the KV from it, and only then does it exit 0."""
    kv = ("--kv-transport", "tcp", "--kv-port", "0")
    with worker(tiny_model_dir, tmp_path / "prefill.log", "--role", "prefill", *kv) as (pre, pre_base), \
            worker(tiny_model_dir, tmp_path / "decode.log", "--role", "decode", *kv) as (_, dec_base):
        body = {"model": "tiny", "prompt": "The baton passes", "temperature": 0}
        hop = _post(pre_base, body | {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        params = hop["kv_transfer_params"]
        assert params["lease_seconds"] == launch.KV_LEASE_SECONDS
        pre.send_signal(signal.SIGTERM)
        time.sleep(DRAIN_ACCEPT_SECONDS + 1.5)
        assert pre.poll() is None, "exited with a KV lease not pulled yet"
        assert ready_status(pre_base)[0] == 503
        out = _post(dec_base, body | {"max_tokens": 4, "ignore_eos": True, "kv_transfer_params": params})
        assert out["usage"]["completion_tokens"] == 4
        assert pre.wait(timeout=10) == 0
    text = (tmp_path / "prefill.log").read_text()
    assert "1 KV caches not pulled yet" in text and "KV leases during the drain: 1 pulled, 0 expired" in text, text
    assert "kv_transfer_failed" not in (tmp_path / "decode.log").read_text()
