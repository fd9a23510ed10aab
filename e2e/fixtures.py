"""pytest fixtures for tests against the local Kubernetes control plane.

Load with ``pytest_plugins = ["baton.e2e.fixtures"]`` in a ``conftest.py``.

* ``local_cluster`` (session): one :class:`~baton.e2e.cluster.LocalCluster` per test session. Builds the
  binaries on first use (minutes, cached afterwards) and fails loudly when anything is missing; skips only
  when ``BATON_SKIP_INTEGRATION=1``.
* ``kubeconfig`` (session): path of its kubeconfig file.
* ``kube_api`` (session): a configured ``kubernetes.client.ApiClient``.
* ``namespace`` (function): a fresh namespace (service account ready), deleted afterwards.
* ``namespace_factory`` (function): ``namespace_factory("suffix")`` makes more of them, all deleted afterwards.
* ``local_prometheus`` (function): a started real Prometheus (:mod:`baton.e2e.prometheus`), no targets yet.
* ``llmservice_crd`` (session): the LLMService CRD applied and Established; returns its object.
* :func:`kubectl`: run the Debian kubectl against the session cluster; :func:`get_json` reads an object
  through it; :func:`condition` picks one condition out of a status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from baton.e2e import build as k8sbuild
from baton.e2e.cluster import LocalCluster

if TYPE_CHECKING:
    from baton.e2e.prometheus import LocalPrometheus

_active_kubeconfig: str | None = None


def kubectl(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    input: str | None = None,
    check: bool = False,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl (the Debian ``kubernetes-client`` build, see :func:`baton.e2e.build.kubectl_path`)
    against ``kubeconfig`` (default: the session's local cluster, else ``$KUBECONFIG``)."""
    binary = k8sbuild.kubectl_path()
    if binary is None:
        raise RuntimeError(
            "kubectl not found: run `baton cluster build` (extracts Debian's kubernetes-client)"
        )
    cfg = kubeconfig or _active_kubeconfig or os.environ.get("KUBECONFIG")
    argv = [binary, *([f"--kubeconfig={cfg}"] if cfg else []), *args]
    # Go's collector at a quarter of the work: a kubectl lives for a fraction of a second, and this cut its CPU
    # from ~70 to ~58 ms a call (20 `get`s, three rounds each, on this 2-core machine)
    env = os.environ | {"GOGC": "400"}
    return subprocess.run(argv, input=input, text=True, capture_output=True, check=check, timeout=timeout, env=env)


def get_json(run, *args: str) -> dict:
    """`kubectl get ARGS -o json` through `run` (the ``kubectl`` fixture or function), parsed."""
    import json

    return json.loads(run("get", *args, "-o", "json", check=True).stdout)


_api_clients: dict[str, object] = {}


def api_get(
    path: str,
    *,
    kubeconfig: str | os.PathLike[str] | None = None,
    query: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict | None:
    """GET one API path (``/api/v1/namespaces/NS/pods``, ``/apis/GROUP/VERSION/...``) of the cluster behind
    ``kubeconfig`` (default as :func:`kubectl`) as parsed JSON; None when it does not exist (404).

    What the tests' polls read with: a ``kubectl get`` is a Go process that costs ~0.1 CPU-second, and a
    real-node test's wait polls up to once a second for minutes, on CI's 2 busy cores (cold run 10 ran ~2000
    kubectl processes, 212 CPU-s); this is one HTTP request on a kept-alive connection of one client per
    kubeconfig. kubectl stays for what a user would type (apply, patch, delete, logs, auth can-i)."""
    import json

    from kubernetes import config
    from kubernetes.client.exceptions import ApiException

    cfg = str(kubeconfig or _active_kubeconfig or os.environ.get("KUBECONFIG") or "")
    if not cfg:
        raise RuntimeError("api_get: no kubeconfig (no session cluster and no $KUBECONFIG)")
    api = _api_clients.get(cfg)
    if api is None:
        api = _api_clients[cfg] = config.new_client_from_config(config_file=cfg)
    # the client's generic request (what its typed methods call), so the answer stays plain JSON
    method, url, headers, _, _ = api.param_serialize(
        "GET", path, query_params=list((query or {}).items()), header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"])
    resp = api.call_api(method, url, header_params=headers, _request_timeout=timeout)
    resp.read()
    if resp.status == 404:
        return None
    if not 200 <= resp.status < 300:
        raise ApiException(http_resp=resp)
    return json.loads(resp.data)


def get_llmservice(name: str, namespace: str, *, kubeconfig: str | os.PathLike[str] | None = None) -> dict | None:
    """LLMService `namespace`/`name` as the API server has it (`api_get`), None while it does not exist."""
    from baton.operator.api import API_VERSION

    return api_get(f"/apis/{API_VERSION}/namespaces/{namespace}/llmservices/{name}", kubeconfig=kubeconfig)


def condition(status: dict, type_: str) -> dict:
    """The condition of `type_` in a status (an empty dict when there is none)."""
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def _skip_requested() -> bool:
    return os.environ.get("BATON_SKIP_INTEGRATION") == "1"


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    global _active_kubeconfig
    if _skip_requested():
        pytest.skip("BATON_SKIP_INTEGRATION=1: the local Kubernetes control plane is disabled")
    cluster = LocalCluster(log=lambda msg: print(f"[baton cluster] {msg}", file=sys.stderr, flush=True))
    cluster.start()
    _active_kubeconfig = str(cluster.kubeconfig)
    try:
        yield cluster
    finally:
        _active_kubeconfig = None
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(local_cluster: LocalCluster) -> Path:
    return local_cluster.kubeconfig


@pytest.fixture(scope="session")
def kube_api(local_cluster: LocalCluster):
    api = local_cluster.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(local_cluster: LocalCluster, kube_api, request) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-") or "test"
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": name, "labels": {"baton.dev/test": "true"}}})
    local_cluster.wait_for_service_account(name)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        # Pods hold node resources (GPUs) until they are gone: mark them deleted now (the namespace controller
        # would take seconds; a terminating namespace accepts no new pods) and wait until the node agent has
        # force-deleted them -- not for the whole namespace.
        try:
            core.delete_collection_namespaced_pod(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and core.list_namespaced_pod(name).items:
            time.sleep(0.2)


@pytest.fixture
def namespace_factory(local_cluster: LocalCluster, kube_api, request) -> Iterator:
    """Like ``namespace``, for tests that need several: ``namespace_factory("a")`` makes a fresh namespace
    (service account ready) whose name contains ``a``; all of them are deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    made: list[str] = []

    def make(suffix: str = "") -> str:
        base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:30].strip("-") or "test"
        name = f"t-{base}-{suffix}-{uuid.uuid4().hex[:6]}".replace("--", "-")
        core.create_namespace({"metadata": {"name": name, "labels": {"baton.dev/test": "true"}}})
        made.append(name)
        local_cluster.wait_for_service_account(name)
        return name

    try:
        yield make
    finally:
        from kubernetes.client.exceptions import ApiException

        for name in made:  # as `namespace` does: delete, then free the nodes of the pods at once
            for call in (core.delete_namespace, core.delete_collection_namespaced_pod):
                try:
                    call(name)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(core.list_namespaced_pod(n).items for n in made):
            time.sleep(0.2)


@pytest.fixture(scope="session")
def llmservice_crd(local_cluster: LocalCluster) -> dict:
    """The repository's LLMService CRD, applied to the session cluster and Established."""
    crd = Path(__file__).resolve().parents[1] / "crds" / "llmservice.yaml"
    kubectl("apply", "-f", str(crd), check=True)
    kubectl("wait", "--for=condition=Established", "crd/llmservices.baton.dev", "--timeout=30s", check=True)
    return get_json(kubectl, "crd", "llmservices.baton.dev")


@pytest.fixture
def local_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrometheus]:
    """A started real Prometheus (Debian `prometheus`, see :mod:`baton.e2e.prometheus`) with no targets yet:
    ``local_prometheus.set_targets(["127.0.0.1:9100"])``; stopped afterwards. Fails loudly when the binary
    is missing; skips only when ``BATON_SKIP_INTEGRATION=1``."""
    from baton.e2e.prometheus import LocalPrometheus

    if _skip_requested():
        pytest.skip("BATON_SKIP_INTEGRATION=1: real servers are disabled")
    prom = LocalPrometheus(tmp_path_factory.mktemp("prometheus"))
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


#: Phase timings that slow integration tests record (e.g. kubelet build, base image, worker image, node
#: start); printed at the end of every run, pass or fail, so CI logs show where the time went.
PHASE_TIMINGS: dict[str, float] = {}
#: Measured counts worth reading in a CI log (e.g. requests ok/failed per disruption), printed likewise.
REPORT_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if PHASE_TIMINGS:
        terminalreporter.section("phase timings (seconds)")
        for name, seconds in PHASE_TIMINGS.items():
            terminalreporter.write_line(f"{name:<55} {seconds:8.1f}")
    if REPORT_LINES:
        terminalreporter.section("measurements")
        for line in REPORT_LINES:
            terminalreporter.write_line(line)
