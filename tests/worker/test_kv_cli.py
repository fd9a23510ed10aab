"""`baton worker` KV flags (--kv-transport/--kv-port/--kv-host, --tensor-parallel-size) and the KV metrics."""
from __future__ import annotations

import argparse

import pytest
from baton.worker.engine.types import EngineStats
from baton.worker.kv.base import TransferHistogram
from baton.worker.metrics import WorkerMetrics
from baton.worker.serve_cli import add_worker_command, build_engine

from .test_server_cli import baton, free_port


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_command(parser.add_subparsers())
    return parser.parse_args(["worker", *argv])


def test_help_lists_the_kv_options():
    out = baton("worker", "--help").stdout
    for flag in ("--kv-transport", "--kv-port", "--kv-host", "--tensor-parallel-size"):
        assert flag in out


def test_tensor_parallel_above_one_is_refused(tiny_model_dir):
    r = baton("worker", "--model", str(tiny_model_dir), "--port", str(free_port()), "--tensor-parallel-size", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--tensor-parallel-size 2: the Baton engine runs on a single device" in r.stderr


def test_env_defaults(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("BATON_KV_PORT", "0")
    monkeypatch.setenv("BATON_KV_TRANSPORT", "tcp")
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    args = parse("--model", str(tiny_model_dir), "--role", "prefill", "--tensor-parallel-size", "1")
    assert args.kv_port == 0
    engine = build_engine(args)
    t = engine.kv_transport
    assert t.name == "tcp" and t.address()[0] == "127.0.0.1" and t.address()[1] > 0
    t._listen_sock.close()


def test_bad_env_transport_is_one_line(monkeypatch, tiny_model_dir):
    from baton.cli import CommandError

    monkeypatch.setenv("BATON_KV_TRANSPORT", "carrier-pigeon")
    with pytest.raises(CommandError, match="BATON_KV_TRANSPORT='carrier-pigeon' is not one of"):
        build_engine(parse("--model", str(tiny_model_dir), "--role", "decode"))


def test_decode_worker_does_not_listen(tiny_model_dir):
    engine = build_engine(parse("--model", str(tiny_model_dir), "--role", "decode", "--kv-transport", "tcp",
                                "--kv-host", "10.1.2.3", "--kv-port", "14579"))
    assert engine.kv_transport._listen_sock is None and engine.kv_transport.address() == ("10.1.2.3", 14579)


def test_both_role_has_no_transport_unless_asked(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("BATON_KV_TRANSPORT", raising=False)
    assert build_engine(parse("--model", str(tiny_model_dir))).kv_transport is None
    e = build_engine(parse("--model", str(tiny_model_dir), "--kv-transport", "inprocess"))
    assert e.kv_transport.name == "inprocess"


def test_kv_port_in_use_is_a_clear_error(tiny_model_dir):
    import socket

    from baton.cli import CommandError

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        with pytest.raises(CommandError, match=f"cannot listen for KV transfers on 127.0.0.1:{port}"):
            build_engine(parse("--model", str(tiny_model_dir), "--role", "prefill", "--kv-transport", "tcp",
                               "--kv-host", "127.0.0.1", "--kv-port", str(port)))


def test_kv_metrics():
    h = TransferHistogram()
    for s in (0.003, 0.02, 7.0):
        h.observe(s)
    stats = EngineStats(kv_transport="ucx-tcp", kv_transfers_total=3, kv_transfer_bytes_total=4096,
                        kv_transfer_seconds_total=7.023, kv_transfer_seconds_buckets=h.cumulative(),
                        kv_transfer_failures={"auth": 2, "timeout": 0})
    m = WorkerMetrics(model_name="tiny", role="decode", stats=lambda: stats,
                      labels={"llmservice": "chat", "namespace": "ml"})
    text = m.render().decode()
    labels = 'llmservice="chat",model_name="tiny",namespace="ml",role="decode"'
    assert f'baton_kv_transport_info{{{labels},transport="ucx-tcp"}} 1.0' in text
    assert f"baton_kv_transfer_bytes_total{{{labels}}} 4096.0" in text
    assert f'baton_kv_transfer_seconds_bucket{{le="0.005",{labels}}} 1.0' in text
    assert f'baton_kv_transfer_seconds_bucket{{le="+Inf",{labels}}} 3.0' in text
    assert f"baton_kv_transfer_seconds_count{{{labels}}} 3.0" in text
    assert 'baton_kv_transfer_failures_total{llmservice="chat",model_name="tiny",namespace="ml",reason="auth",' \
           'role="decode"} 2.0' in text
