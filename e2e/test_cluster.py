"""Integration tests: the local control plane schedules, runs (fakes) and deletes pods for real."""

from __future__ import annotations

import json
import time

import pytest
from baton.e2e.fixtures import kubectl
from baton.e2e.processes import wait_for
from kubernetes import client

pytestmark = pytest.mark.integration


def deployment(name, replicas, node_selector=None, gpus=0):
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": node_selector or {},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{"name": "main", "image": "baton/test:0", "resources": resources}],
                },
            },
        },
    }


def test_cluster_is_up(local_cluster, kube_api):
    assert local_cluster.healthy()
    assert client.VersionApi(kube_api).get_code().git_version == "v1.20.2"
    nodes = client.CoreV1Api(kube_api).list_node().items
    by_name = {n.metadata.name: n for n in nodes}
    assert {"gpu-prefill-0", "gpu-prefill-1", "gpu-decode-0", "gpu-decode-1", "cpu-0"} <= set(by_name)
    for n in nodes:
        assert not [t for t in (n.spec.taints or []) if t.key.startswith("node.kubernetes.io/")]
        ready = [c for c in n.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
    assert by_name["gpu-decode-0"].status.allocatable["nvidia.com/gpu"] == "8"
    assert by_name["cpu-0"].status.allocatable["nvidia.com/gpu"] == "0"
    assert by_name["gpu-decode-1"].metadata.labels["baton.dev/pool"] == "decode"
    zones = {n.metadata.labels["topology.kubernetes.io/zone"] for n in nodes}
    assert len(zones) == 2


def test_deployment_lands_on_decode_pool_and_becomes_available(local_cluster, kube_api, namespace):
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, deployment("dec", 4, {"baton.dev/pool": "decode"}, gpus=2))

    def available():
        d = apps.read_namespaced_deployment("dec", namespace)
        return d.status.available_replicas == 4 and d.status.ready_replicas == 4

    wait_for("4 available replicas", available, timeout=60)
    pods = core.list_namespaced_pod(namespace, label_selector="app=dec").items
    assert len(pods) == 4
    assert {p.spec.node_name for p in pods} <= {"gpu-decode-0", "gpu-decode-1"}
    assert all(p.status.phase == "Running" for p in pods)
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == 4 and all(ip.startswith("10.244.") for ip in ips)
    for p in pods:
        assert p.status.container_statuses[0].ready
        assert {c.type for c in p.status.conditions if c.status == "True"} >= {"Ready", "ContainersReady"}


def test_pod_requesting_too_many_gpus_stays_pending(local_cluster, kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "greedy"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "baton/test:0",
                        "resources": {"limits": {"nvidia.com/gpu": "9"}},
                    }
                ]
            },
        },
    )

    def unschedulable():
        p = core.read_namespaced_pod("greedy", namespace)
        cond = [c for c in (p.status.conditions or []) if c.type == "PodScheduled"]
        return cond and cond[0].status == "False" and cond[0].reason == "Unschedulable" and p

    p = wait_for("PodScheduled=False/Unschedulable", unschedulable, timeout=30)
    assert p.status.phase == "Pending" and not p.spec.node_name
    assert "nvidia.com/gpu" in next(c for c in p.status.conditions if c.type == "PodScheduled").message
    time.sleep(2)
    assert core.read_namespaced_pod("greedy", namespace).status.phase == "Pending"


def test_gpu_capacity_is_respected_across_pods(local_cluster, kube_api, namespace):
    """Two private 8-GPU nodes: three 5-GPU pods -> two run (one per node), one stays Pending."""
    from baton.e2e.cluster import gpu_node

    pool = f"cap-{namespace[-6:]}"
    names = [f"{pool}-0", f"{pool}-1"]
    for i, name in enumerate(names):
        local_cluster.add_node(gpu_node(name, pool, f"zone-{'ab'[i]}"))
    try:
        apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
        apps.create_namespaced_deployment(namespace, deployment("big", 3, {"baton.dev/pool": pool}, gpus=5))

        def settled():
            pods = core.list_namespaced_pod(namespace, label_selector="app=big").items
            running = [p for p in pods if p.status.phase == "Running"]
            return len(pods) == 3 and len(running) == 2 and pods

        pods = wait_for("2 of 3 running", settled, timeout=60)
        assert sorted(p.spec.node_name for p in pods if p.spec.node_name) == names
        pending = [p for p in pods if p.status.phase == "Pending"]
        assert len(pending) == 1 and not pending[0].spec.node_name
    finally:  # free the private nodes' pods before the nodes go (nothing would serve them after)
        client.AppsV1Api(kube_api).delete_namespaced_deployment("big", namespace)
        core = client.CoreV1Api(kube_api)
        wait_for("pods gone", lambda: not core.list_namespaced_pod(namespace).items, timeout=30)
        for name in names:
            local_cluster.remove_node(name)


def test_deleting_deployment_removes_pods(local_cluster, kube_api, namespace):
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, deployment("gone", 3, {"baton.dev/pool": "prefill"}))
    wait_for("3 available",
             lambda: apps.read_namespaced_deployment("gone", namespace).status.available_replicas == 3, timeout=60)
    apps.delete_namespaced_deployment("gone", namespace, propagation_policy="Background")
    wait_for("pods gone (no Terminating left)", lambda: not core.list_namespaced_pod(namespace).items, timeout=60)
    assert not apps.list_namespaced_replica_set(namespace).items


def test_deleted_pod_with_grace_period_does_not_hang(local_cluster, kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "p"},
            "spec": {
                "nodeSelector": {"baton.dev/pool": "cpu"},
                "terminationGracePeriodSeconds": 600,
                "containers": [{"name": "main", "image": "baton/test:0"}],
            },
        },
    )
    wait_for("Running", lambda: core.read_namespaced_pod("p", namespace).status.phase == "Running", timeout=30)
    core.delete_namespaced_pod("p", namespace)
    t0 = time.monotonic()
    wait_for("pod deleted", lambda: not core.list_namespaced_pod(namespace).items, timeout=20)
    assert time.monotonic() - t0 < 20


def test_service_gets_endpoints_from_fake_pod_ips(local_cluster, kube_api, namespace):
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, deployment("web", 2, {"baton.dev/pool": "cpu"}))
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )

    def endpoints():
        try:
            ep = core.read_namespaced_endpoints("web", namespace)
        except client.ApiException as exc:
            if exc.status == 404:  # the endpoints controller has not created it yet
                return None
            raise
        addrs = [a.ip for s in (ep.subsets or []) for a in (s.addresses or [])]
        return len(addrs) == 2 and addrs

    addrs = wait_for("2 endpoints", endpoints, timeout=60)
    assert all(a.startswith("10.244.") for a in addrs)


def test_kubectl_works(local_cluster, namespace):
    out = kubectl("get", "nodes", "-o", "json", check=True)
    names = {n["metadata"]["name"] for n in json.loads(out.stdout)["items"]}
    assert "gpu-prefill-0" in names
    manifest = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "v"}}
    )
    kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=True)
    got = kubectl("get", "configmap", "cm", "-n", namespace, "-o", "jsonpath={.data.k}", check=True)
    assert got.stdout == "v"
    version = kubectl("version", "-o", "json", check=True)
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == "v1.20.2"


def test_node_heartbeat_is_fresh(local_cluster, kube_api):
    assert local_cluster.agent is not None and local_cluster.agent.alive
    node = client.CoreV1Api(kube_api).read_node_status("gpu-decode-0")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    age = time.time() - ready.last_heartbeat_time.timestamp()
    assert age < local_cluster.agent.heartbeat_interval + 15


def test_second_cluster_runs_alongside_and_stops_without_leftovers(local_cluster):
    from baton.e2e.cluster import LocalCluster, _alive, cpu_node

    other = LocalCluster(nodes=[cpu_node("solo-0", "zone-a")])
    other.start()
    try:
        assert other.server != local_cluster.server and other.healthy() and local_cluster.healthy()
        nodes = client.CoreV1Api(other.api_client()).list_node().items
        assert [n.metadata.name for n in nodes] == ["solo-0"]
        pids = [c.pid for c in other.components.values()]
        run_dir = other.run_dir
    finally:
        other.stop()
    for pid in pids:
        assert not _alive(pid), f"pid {pid} survived stop()"
    assert not run_dir.exists()
    assert local_cluster.healthy()
