"""Real nodes, for real: the worker image built from docker/worker.Dockerfile runs under kubelet + containerd +
runc on two nodes; readiness probes gate Ready; pod IPs and a ClusterIP answer from the host; `kubectl logs`
works; a deleted pod is replaced; and stopping the cluster leaves nothing of ours on the host.

Slow (a cold machine builds kubelet, a base image and the worker image first: see the printed phase timings).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from baton.e2e import build as k8sbuild
from baton.e2e import hostclean, images
from baton.e2e.cluster import LocalCluster
from baton.e2e.fixtures import kubectl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL_NAME = "tiny-llama"


def _log(msg: str) -> None:
    print(f"[real nodes] {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    path = tmp_path_factory.mktemp("models") / MODEL_NAME
    create_tiny_model(path)
    path.parent.chmod(0o755)
    for p in [path, *path.rglob("*")]:  # the worker runs as uid 1000 in its pod
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    k8sbuild.ensure_binaries(log=_log, names=k8sbuild.ALL_BINARIES)
    timings["kubelet/kube-proxy build (0 = cached)"] = time.monotonic() - t0
    t0 = time.monotonic()
    images.base_image(log=_log)
    timings["base image (0 = cached)"] = time.monotonic() - t0
    worker = images.build_image("worker", log=_log)
    timings["worker image (0 = cached)"] = worker.seconds
    cluster = LocalCluster(real_nodes=2, images=[worker.path], log=_log)
    t0 = time.monotonic()
    cluster.start()
    timings["cluster + 2 real nodes start"] = time.monotonic() - t0
    timings.update({f"  of which {k}": v for k, v in cluster.real.timings.items()})
    record = hostclean.read_record()
    assert record is not None and record.root == str(cluster.real.root)
    cluster.worker_ref = worker.ref
    cluster.record = record
    cluster.timings = timings
    try:
        yield cluster
    finally:
        cluster.stop()
        for name, sec in timings.items():
            print(f"phase timing: {name}: {sec:.1f}s", file=sys.stderr)


def _k(cluster, *args: str, input: str | None = None, check: bool = True, timeout: float = 60):
    return kubectl(*args, kubeconfig=cluster.kubeconfig, input=input, check=check, timeout=timeout)


def _get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _pods(cluster, selector: str) -> list[dict]:
    out = _k(cluster, "get", "pods", "-n", "default", "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def _ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


def _wait(what: str, check, timeout: float = 180.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _worker_manifest(image: str, model_dir: Path, ready_path: str = "/ready") -> str:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "tiny"}},
            "template": {
                "metadata": {"labels": {"app": "tiny"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    # one pod per real node
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"labelSelector": {"matchLabels": {"app": "tiny"}},
                                 "topologyKey": "kubernetes.io/hostname"}
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": ["worker", "--role", "both", "--model", "/models/tiny-llama",
                                     "--served-model-name", MODEL_NAME, "--host", "0.0.0.0", "--port", "8000"],
                            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": ready_path, "port": "http"},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                        }
                    ],
                    "volumes": [{"name": "models", "hostPath": {"path": str(model_dir.parent), "type": "Directory"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {"selector": {"app": "tiny"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [deployment, service]})


CRASHER = r"""
import json, os, signal, subprocess, sys, time
from baton.e2e.cluster import LocalCluster
from baton.e2e.fixtures import kubectl
from baton.e2e.images import PAUSE_REF

c = LocalCluster(real_nodes=1, run_dir=sys.argv[1], keep_run_dir=True)
c.start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
       "spec": {"containers": [{"name": "p", "image": PAUSE_REF, "imagePullPolicy": "Never"}]}}
kubectl("apply", "-f", "-", kubeconfig=c.kubeconfig, input=json.dumps(pod), check=True)
kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=120s", kubeconfig=c.kubeconfig, check=True, timeout=130)
print("RUNNING", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind: a crashed test run
"""


def test_cluster_down_recovers_a_crashed_run(tmp_path):
    """A test process killed with a pod running leaves shims, containers, mounts, a bridge, iptables chains and
    cgroups behind; `baton cluster down` (of any name: the crashed run had none) removes all of it."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "run")], text=True,
                          capture_output=True, timeout=300)
    assert "RUNNING" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    rec = hostclean.read_record()
    assert rec is not None
    left = hostclean.leftovers(rec)
    assert any("in our cgroups" in x for x in left), left  # the pod's processes outlived the crash
    assert any(x.startswith("interface") for x in left) and any(x.startswith("mount") for x in left), left
    down = subprocess.run([sys.executable, "-m", "baton.cli", "cluster", "down", "--name", "no-such-cluster"],
                          text=True, capture_output=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert hostclean.leftovers(rec) == []
    assert hostclean.read_record() is None


def test_nodes_are_real_and_in_their_pools(real_cluster):
    nodes = json.loads(_k(real_cluster, "get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(by_name) == {"real-0", "real-1"}
    assert by_name["real-0"]["metadata"]["labels"]["baton.dev/pool"] == "prefill"
    assert by_name["real-1"]["metadata"]["labels"]["baton.dev/pool"] == "decode"
    for n in nodes:
        info = n["status"]["nodeInfo"]
        assert info["containerRuntimeVersion"].startswith("containerd://"), info
        assert info["kubeletVersion"] == k8sbuild.K8S_VERSION
        assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"  # fake GPUs, the extended-resource way
        assert not [t for t in n["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]


def test_worker_image_serves_on_real_nodes(real_cluster, tiny_model):
    c = real_cluster
    # A probe on a path the worker does not serve: the pods run but must never turn Ready.
    _k(c, "apply", "-f", "-", input=_worker_manifest(c.worker_ref, tiny_model, ready_path="/nope"))
    running = _wait(
        "2 worker containers running",
        lambda: (p := _pods(c, "app=tiny")) and len(p) == 2
        and all(cs.get("state", {}).get("running") for x in p for cs in x["status"].get("containerStatuses", []))
        and all(x["status"].get("containerStatuses") for x in p) and p,
    )
    assert {p["spec"]["nodeName"] for p in running} == {"real-0", "real-1"}
    # the engine is up (it answers /ready from the host) yet the pod stays unready: the kubelet probes for real
    ips = [p["status"]["podIP"] for p in running]
    _wait("worker /ready on both pod IPs", lambda: all(_get(f"http://{ip}:8000/ready")[0] == 200 for ip in ips))
    time.sleep(3)
    assert not any(_ready(p) for p in _pods(c, "app=tiny")), "Ready although the readiness probe fails"

    # The right probe: a rollout to Ready pods.
    _k(c, "apply", "-f", "-", input=_worker_manifest(c.worker_ref, tiny_model))
    _k(c, "rollout", "status", "deployment/tiny", "-n", "default", "--timeout=240s", timeout=250)
    pods = _wait("2 Ready pods", lambda: (p := [x for x in _pods(c, "app=tiny") if _ready(x)]) and len(p) == 2 and p)
    assert {p["spec"]["nodeName"] for p in pods} == {"real-0", "real-1"}
    for p in pods:  # pod IPs answer from the host
        status, body = _get(f"http://{p['status']['podIP']}:8000/v1/models")
        assert status == 200 and MODEL_NAME in body.decode(), body

    # the ClusterIP answers (kube-proxy iptables); with both pods behind it, both get traffic
    svc = json.loads(_k(c, "get", "svc", "tiny", "-n", "default", "-o", "json").stdout)
    cluster_ip = svc["spec"]["clusterIP"]
    status, body = _get(f"http://{cluster_ip}:80/v1/models")
    assert status == 200 and MODEL_NAME in body.decode()
    req = urllib.request.Request(
        f"http://{cluster_ip}:80/v1/completions",
        data=json.dumps({"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        completion = json.loads(resp.read())
    assert completion["choices"][0]["text"], completion
    assert completion["usage"]["completion_tokens"] == 4

    # kubectl logs goes apiserver -> kubelet (client certificate) -> containerd
    logs = _k(c, "logs", "-n", "default", pods[0]["metadata"]["name"], timeout=30).stdout
    assert "Uvicorn running" in logs or "Application startup complete" in logs, logs[-2000:]

    # a deleted pod is replaced, on a real node, and the replacement turns Ready
    victim = pods[0]["metadata"]["name"]
    _k(c, "delete", "pod", "-n", "default", victim, "--wait=false")
    _wait(
        "a Ready replacement",
        lambda: (p := [x for x in _pods(c, "app=tiny") if _ready(x) and x["metadata"]["name"] != victim
                       and not x["metadata"].get("deletionTimestamp")]) and len(p) == 2 and p,
        timeout=240,
    )
    assert {p["spec"]["nodeName"] for p in _pods(c, "app=tiny") if _ready(p)} <= {"real-0", "real-1"}


def test_cluster_down_leaves_nothing(real_cluster):
    """Runs last in this module: stop the cluster and look for anything of ours on the host."""
    rec = real_cluster.record
    assert any(x.startswith("process") for x in hostclean.leftovers(rec))
    real_cluster.stop()
    left = hostclean.leftovers(rec)
    assert left == [], left
    assert hostclean.read_record() is None
