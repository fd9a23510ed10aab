"""NIXL's progress thread gets a poll timeout (`worker/vllm_cli.py`, `calm_nixl_progress_thread`): NIXL's Python API
creates every agent with `pthrDelay = 0`, and its UCX progress thread then polls with a zero timeout, a core per
vLLM process with a KV connector. Pure logic against a stand-in binding; the real NIXL in `.venv-vllm` below."""
from __future__ import annotations

import subprocess
import types
from pathlib import Path

import pytest
from baton.worker import vllm_cli

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
    assert vllm_cli.calm_nixl_progress_thread(api, 1000)
    assert _agent_delay(api) == 1000
    config = api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 5000  # a larger one is kept
    assert config.pthrDelay == 5000
    assert not vllm_cli.calm_nixl_progress_thread(api, 2000)  # once per process: the first patch stays
    assert _agent_delay(api) == 1000


def test_zero_keeps_nixls_busy_polling():
    api = _fake_api()
    assert not vllm_cli.calm_nixl_progress_thread(api, 0)
    assert _agent_delay(api) == 0


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
    assert out.stdout.split()[-2:] == ["AgentConfig", str(vllm_cli.NIXL_PROGRESS_DELAY_US)], out.stdout
