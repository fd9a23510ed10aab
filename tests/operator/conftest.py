"""Fixtures the operator's integration modules share."""
from __future__ import annotations

import pytest
from baton.e2e.processes import OperatorProcess


@pytest.fixture(scope="module")
def operator(local_cluster, kubeconfig, llmservice_crd, kubectl, tmp_path_factory):
    """`baton operator run -A` as a process, once its admission webhook is registered; stopped after the module."""
    op = OperatorProcess(str(kubeconfig), tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        op.wait_webhook_registered()
    except AssertionError as exc:
        op.stop()
        raise AssertionError(f"operator did not come up; {exc}") from None
    yield op
    op.stop()
