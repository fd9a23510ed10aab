"""A vLLM worker's KV-layout fingerprint on its HTTP answers, so the Baton router pairs vLLM workers by layout too.

The router hands a KV cache only between a prefill and a decode worker of equal fingerprints (`worker/router/
pairing.py`); a Baton worker reports its fingerprint on /ready, but vLLM's /health answers an empty 200, and a
worker without one is trusted to match any. During a rollout that changes the KV layout (`--block-size`,
`--dtype`, a new model revision, another vLLM), old and new vLLM pods then run side by side with nothing to tell
them apart: a decode pod of the new layout could be handed the KV of an old prefill pod.

`KVLayoutHeader` is a pure ASGI middleware that vLLM's API server loads by import path (`vllm serve --middleware
vllm_kv_layout.KVLayoutHeader`; `vllm_cli.py` adds it to every `serve` it runs: the Baton vLLM image and
`.venv-vllm`). It adds the header `X-Baton-KV-Fingerprint` (the launch contract's `Header.KV_FINGERPRINT`) to
every answer, computed once from the config vLLM itself runs with (`app.state.vllm_config`): vLLM's version,
the model folder's identity, KV dtype, block size, tensor parallelism and the cache's shape -- the same parts
and digest as a Baton worker's (`worker/engine/fingerprint.py`, loaded from the file beside this one; the vLLM
image copies both with the same layout). A vLLM image of the user's own (no `vllm_cli.py`) reports none, as
before: its workers are trusted to match.

Runs under vLLM's interpreter and imports nothing of the `baton` package (it is not installed there).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

#: `baton.launch.Header.KV_FINGERPRINT` (this file cannot import baton; tests/worker/test_vllm_kv_layout.py keeps
#: the two equal)
HEADER = "X-Baton-KV-Fingerprint"
#: the import path `vllm serve --middleware` takes (`vllm_cli.py` adds it)
MIDDLEWARE = "vllm_kv_layout.KVLayoutHeader"

log = logging.getLogger("vllm_kv_layout")


def _load_fingerprint() -> Any:
    """`worker/engine/fingerprint.py` as a module of its own (pure: dataclasses, hashlib, json, pathlib)."""
    name = "baton_kv_fingerprint"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "engine" / "fingerprint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fingerprint_module = _load_fingerprint()


def _int(value: Any) -> int:
    try:
        return int(value() if callable(value) else value)
    except (TypeError, ValueError):
        return 0


def layout(vllm_config: Any, version: str) -> Any:
    """The `KVLayout` of a vLLM worker from its `VllmConfig`. Pure but for `model_identity` (stats the folder).

    A block size vLLM has not settled in this process (None: the CPU platform sets its default in the engine
    core) counts as 0, "vLLM's default": equal for equal versions and arguments, as it should be."""
    fp = fingerprint_module
    model_config, cache = vllm_config.model_config, vllm_config.cache_config
    model = str(model_config.model)
    cache_dtype = str(getattr(cache, "cache_dtype", "auto") or "auto")
    return fp.KVLayout(
        engine="vllm",
        engine_version=version,
        model=fp.model_identity(model) if Path(model).is_dir() else model,
        dtype=fp.dtype_name(model_config.dtype) if cache_dtype == "auto" else cache_dtype,
        block_size=_int(getattr(cache, "block_size", None)),
        tensor_parallel=_int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)),
        num_layers=_int(getattr(model_config.hf_config, "num_hidden_layers", 0)),
        num_kv_heads=_int(getattr(model_config, "get_total_num_kv_heads", 0)),
        head_dim=_int(getattr(model_config, "get_head_size", 0)),
    )


def _vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except ImportError:
        return "unknown"


class KVLayoutHeader:
    """ASGI middleware: every HTTP answer carries `HEADER` once vLLM's config is on the app's state."""

    def __init__(self, app: Any, version: str | None = None) -> None:
        self.app = app
        self.version = version
        self.value: bytes | None = None

    def _fingerprint(self, scope: dict) -> bytes | None:
        if self.value is None:
            config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            if config is None:  # not served yet (vLLM sets the state before it listens)
                return None
            try:
                text = fingerprint_module.fingerprint(layout(config, self.version or _vllm_version()))
            except Exception as exc:  # noqa: BLE001 - no fingerprint is "unknown", never a failed request
                log.warning("no KV-layout fingerprint for this vLLM worker (%s): its router trusts it to match", exc)
                text = ""
            else:
                log.info("KV-layout fingerprint %s", text)
            self.value = text.encode()
        return self.value or None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        value = self._fingerprint(scope)
        if value is None:
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER.lower().encode(), value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)
