"""The KV-layout fingerprint of a vLLM worker (worker/vllm_kv_layout.py), without vLLM: its config stood in by
plain objects with the attributes it reads. The real vLLM answers with it in tests/worker/test_vllm.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from baton.worker import vllm_cli, vllm_kv_layout
from baton.worker.engine import fingerprint as baton_fp
from baton.worker.router.pool import parse_fingerprint

from baton import launch


def _config(model: Path, *, block_size: int | None = 128, dtype: str = "torch.float32", cache_dtype: str = "auto",
            tp: int = 1) -> SimpleNamespace:
    hf = SimpleNamespace(num_hidden_layers=30)
    model_config = SimpleNamespace(model=str(model), dtype=dtype, hf_config=hf,
                                   get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64)
    return SimpleNamespace(model_config=model_config,
                           cache_config=SimpleNamespace(block_size=block_size, cache_dtype=cache_dtype),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


def _model(tmp_path: Path) -> Path:
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    return folder


def test_the_contract_strings_are_the_launch_contracts():
    assert vllm_kv_layout.HEADER == launch.Header.KV_FINGERPRINT
    assert vllm_cli.KV_LAYOUT_MIDDLEWARE == vllm_kv_layout.MIDDLEWARE
    module, name = vllm_kv_layout.MIDDLEWARE.rsplit(".", 1)
    assert module == Path(vllm_kv_layout.__file__).stem and hasattr(vllm_kv_layout, name)


def test_vllm_cli_adds_the_middleware_to_serve_once():
    argv = ["vllm", "serve", "/models/m", "--port", "8000"]
    assert vllm_cli.with_kv_layout_header(argv) == [*argv, "--middleware", vllm_kv_layout.MIDDLEWARE]
    once = vllm_cli.with_kv_layout_header(argv)
    assert vllm_cli.with_kv_layout_header(once) == once
    assert vllm_cli.with_kv_layout_header(["vllm", "--version"]) == ["vllm", "--version"]


def test_a_vllm_layout_digests_like_a_baton_workers(tmp_path):
    model = _model(tmp_path)
    got = vllm_kv_layout.layout(_config(model), "0.32.0")
    want = baton_fp.KVLayout(engine="vllm", engine_version="0.32.0", model=baton_fp.model_identity(model),
                             dtype="float32", block_size=128, tensor_parallel=1, num_layers=30, num_kv_heads=3,
                             head_dim=64)
    assert vllm_kv_layout.fingerprint_module.fingerprint(got) == baton_fp.fingerprint(want)


def test_every_part_of_the_layout_changes_the_fingerprint(tmp_path):
    model = _model(tmp_path)
    fp = vllm_kv_layout.fingerprint_module.fingerprint

    def of(config, version="0.32.0") -> str:
        return fp(vllm_kv_layout.layout(config, version))

    base = of(_config(model))
    assert of(_config(model)) == base
    others = [of(_config(model, block_size=64)), of(_config(model, dtype="torch.bfloat16")),
              of(_config(model, cache_dtype="fp8")), of(_config(model, tp=2)), of(_config(model), "0.33.0"),
              of(_config(model, block_size=None))]
    (model / "model.safetensors").write_bytes(b"0" * 11)  # another revision of the weights
    others.append(of(_config(model)))
    assert base not in others and len(set(others)) == len(others)


def test_the_middleware_puts_the_fingerprint_on_every_answer_once_vllm_has_a_config(tmp_path):
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request"}

    async def send(message):
        sent.append(message)

    middleware = vllm_kv_layout.KVLayoutHeader(app, version="0.32.0")
    state = SimpleNamespace()
    scope = {"type": "http", "path": "/health", "app": SimpleNamespace(state=state)}
    asyncio.run(middleware(scope, receive, send))
    assert b"x-baton-kv-fingerprint" not in dict(sent[0]["headers"])  # no config yet: unknown, not cached
    state.vllm_config = _config(_model(tmp_path))
    for path in ("/health", "/v1/completions"):
        sent.clear()
        asyncio.run(middleware({**scope, "path": path}, receive, send))
        headers = dict(sent[0]["headers"])
        value = headers[vllm_kv_layout.HEADER.lower().encode()].decode()
        assert value.startswith("kv1-") and headers[b"content-length"] == b"0"
        # what the router's health check makes of it (an empty /health body, the header)
        assert parse_fingerprint(b"", value) == value


def test_a_config_it_cannot_read_leaves_the_worker_unknown_not_failing():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    middleware = vllm_kv_layout.KVLayoutHeader(app, version="x")
    scope = {"type": "http", "path": "/health", "app": SimpleNamespace(state=SimpleNamespace(vllm_config=object()))}
    asyncio.run(middleware(scope, None, send))
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]
