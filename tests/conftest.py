"""Shared fixtures. The local-cluster fixtures come from the `baton.e2e.fixtures` plugin (see pyproject)."""
from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def kubectl(local_cluster):
    """kubectl bound to the session's local cluster: `kubectl("get", "pods", check=True).stdout`."""
    from baton.e2e.fixtures import kubectl as run

    return functools.partial(run, kubeconfig=local_cluster.kubeconfig)


@pytest.fixture(scope="session")
def vllm_parser():
    """vLLM's own command-line parser, ONE process for the whole session (tests/vllm_parser.py); skips without
    .venv-vllm (scripts/setup makes it)."""
    from tests.vllm_parser import VLLM_PYTHON, VllmParser

    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON} (scripts/setup vllm creates it)")
    parser = VllmParser()
    yield parser
    parser.close()
