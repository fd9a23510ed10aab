"""NIXL's progress thread gets a poll timeout (`worker/nixl_progress.py`): NIXL's Python API creates every agent with
`pthrDelay = 0`, and its UCX progress thread then polls with a zero timeout, a core per process that holds an
agent -- vLLM's with a KV connector (`vllm_cli.py`) and Baton's own workers on the NIXL KV transport
(`kv/nixl.py`). Pure logic against a stand-in binding; then the real NIXL, in `.venv` and in `.venv-vllm`."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from baton.worker import nixl_progress, vllm_cli
from baton.worker.kv import nixl as kv_nixl

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def _fake_api() -> types.SimpleNamespace:
    class AgentConfig:  # nixlBind.nixlAgentConfig: plain attributes
        pthrDelay = 0

    def agent(name: str, config: AgentConfig):  # what nixl._api.nixl_agent.__init__ does with it
        return config

    return types.SimpleNamespace(nixlBind=types.SimpleNamespace(nixlAgentConfig=AgentConfig, nixlAgent=agent))


def _agent_delay(api) -> int:
    config = api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 0  # NIXL's hard-coded value
    return api.nixlBind.nixlAgent("a", config).pthrDelay


def test_every_agent_config_gets_at_least_the_delay():
    api = _fake_api()
    assert _agent_delay(api) == 0
    assert nixl_progress.calm_nixl_progress_thread(api, 1000)
    assert _agent_delay(api) == 1000
    config = api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 5000  # a larger one is kept
    assert config.pthrDelay == 5000
    assert not nixl_progress.calm_nixl_progress_thread(api, 2000)  # once per process: the first patch stays
    assert _agent_delay(api) == 1000


def test_zero_keeps_nixls_busy_polling():
    api = _fake_api()
    assert not nixl_progress.calm_nixl_progress_thread(api, 0)
    assert _agent_delay(api) == 0


def test_the_delay_comes_from_the_environment_and_a_bad_one_is_named():
    assert nixl_progress.delay_from_env({}) == nixl_progress.DEFAULT_DELAY_US
    assert nixl_progress.delay_from_env({nixl_progress.ENV: " 250 "}) == 250
    assert nixl_progress.delay_from_env({nixl_progress.ENV: "0"}) == 0
    for bad in ("1ms", "-1", ""):
        with pytest.raises(nixl_progress.BadDelay, match=nixl_progress.ENV):
            nixl_progress.delay_from_env({nixl_progress.ENV: bad})


def test_vllm_cli_refuses_a_bad_delay_in_one_line(monkeypatch):
    monkeypatch.setenv(nixl_progress.ENV, "1ms")
    with pytest.raises(SystemExit, match=f"vllm: error: {nixl_progress.ENV}='1ms'"):
        vllm_cli._calm_nixl_if_used(["vllm", "serve", "/m", "--kv-transfer-config", "{}"])


def test_only_a_serve_with_a_kv_connector_is_patched(monkeypatch):
    imported = []
    monkeypatch.setattr(vllm_cli.importlib, "import_module", lambda name: imported.append(name) or _fake_api())
    vllm_cli._calm_nixl_if_used(["vllm", "serve", "/m", "--port", "8000"])
    assert imported == []
    vllm_cli._calm_nixl_if_used(["vllm", "serve", "/m", "--kv-transfer-config", "{}"])
    vllm_cli._calm_nixl_if_used(["vllm", "serve", "/m", "--kv-transfer-config={}"])
    assert imported == ["nixl._api", "nixl._api"]


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"no vLLM virtualenv at {VLLM_PYTHON}")
def test_the_real_nixl_agent_config_takes_the_delay():
    """In vLLM's interpreter, with the NIXL vLLM imports: the patched config class is what `nixl._api` builds its
    agents with, and NIXL's own assignment of 0 leaves the delay."""
    cli = str(REPO / "worker" / "vllm_cli.py")
    code = (
        "import sys; sys.argv = ['vllm', 'serve', '/m', '--kv-transfer-config', '{}']\n"
        f"import runpy; runpy.run_path({cli!r}, run_name='__mp_main__')\n"
        "import nixl._api as api\n"
        "c = api.nixlBind.nixlAgentConfig(); c.pthrDelay = 0\n"
        "print(type(c).__name__, c.pthrDelay)\n")
    out = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["AgentConfig", str(nixl_progress.DEFAULT_DELAY_US)], out.stdout


@pytest.mark.skipif(kv_nixl.unavailable_reason() is not None, reason=f"NIXL not usable: {kv_nixl.unavailable_reason()}")
def test_a_baton_worker_nixl_agent_idles_without_spinning_a_core():
    """Baton's NIXL KV transport, in a process of its own: its agent's config class carries the floor, and the
    process, holding a started agent and doing nothing, uses a few per cent of a core over 3 s (busy polling: 60-100
    %, whatever else runs; polling at 1 ms: ~2 %)."""
    code = (
        "import time, resource\n"
        "from baton.worker.kv.nixl import NIXLKVTransport\n"
        "from nixl import _api\n"
        "t = NIXLKVTransport('127.0.0.1', 0, serve=False)\n"
        "time.sleep(0.5)\n"
        "def cpu():\n"
        "    r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "    return r.ru_utime + r.ru_stime\n"
        "c0, w0 = cpu(), time.monotonic()\n"
        "time.sleep(3)\n"
        "print(_api.nixlBind.nixlAgentConfig.baton_min_delay_us, (cpu() - c0) / (time.monotonic() - w0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    floor, share = out.stdout.split()[-2:]
    assert int(floor) == nixl_progress.DEFAULT_DELAY_US
    assert float(share) < 0.3, f"an idle NIXL agent used {float(share):.0%} of a core"
