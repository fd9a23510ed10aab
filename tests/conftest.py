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
