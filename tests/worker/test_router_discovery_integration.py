"""The router's Kubernetes Endpoints discovery against a REAL kube-apiserver and controller-manager.

Headless Services `x-prefill` / `x-decode` (ports `metrics` and `http`) select Deployments' pods; the local
cluster's node agent marks those pods Running/Ready with fake IPs (10.244.x.y, nothing listens there), the
endpoints controller fills the Endpoints, and the router's discovery -- configured exactly as
`baton router --prefill-service x-prefill --decode-service x-decode --namespace NS` configures it, with a
kubeconfig-based client since this is not a pod -- must follow them: scale up/down, a deleted pod, and
not-ready addresses (a pod the agent does not serve, whose status the test sets) left out.

Health checks of the fake IPs fail, so the tests look at discovery's output (the pool's known endpoints), not
at routing. One test runs the real `baton router` command and reads what it logs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from baton.e2e.processes import wait_for as shared_wait_for
from kubernetes import client

pytestmark = pytest.mark.integration

PORT = 8000
GHOST_IP_PREFIX = "10.245."  # outside the agent's pod range: the not-ready pod's address


#: The shared poller, with this file's tighter defaults (discovery polls every second).
wait_for = functools.partial(shared_wait_for, timeout=20.0, interval=0.1)


def service(name: str, role: str) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "x", "role": role},
            "ports": [{"name": "metrics", "port": 9090, "targetPort": 9090},
                      {"name": "http", "port": PORT, "targetPort": PORT}],
        },
    }


def deployment(name: str, role: str, replicas: int) -> dict:
    labels = {"app": "x", "role": role, "owner": "deployment"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"baton.dev/pool": "cpu"},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{"name": "worker", "image": "baton/test:0",
                                    "ports": [{"name": "http", "containerPort": PORT}]}],
                },
            },
        },
    }


def ready_pod_urls(core: client.CoreV1Api, ns: str, role: str, replicas: int) -> list[str] | None:
    """URLs of the Deployment's pods once exactly `replicas` are Running/Ready (none terminating)."""
    pods = core.list_namespaced_pod(ns, label_selector=f"app=x,role={role},owner=deployment").items
    if len(pods) != replicas:
        return None
    urls = []
    for p in pods:
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        if p.metadata.deletion_timestamp or p.status.phase != "Running" or not ready or not p.status.pod_ip:
            return None
        urls.append(f"http://{p.status.pod_ip}:{PORT}")
    return sorted(urls)


class RouterThread:
    """The router's aiohttp app (from `baton router`'s own config path) on a loopback port, in a thread."""

    def __init__(self, argv: list[str]) -> None:
        from baton.worker.router.cli import build_config
        from baton.worker.router.discovery import load_kube_api

        from baton.cli import build_parser

        self.config = build_config(build_parser().parse_args(["router", *argv]))
        self.config.kube_api = load_kube_api()  # as run_router does
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="router-discovery")
        self.started = threading.Event()
        self.router = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        from aiohttp import web
        from baton.worker.router.app import ROUTER_KEY, create_app

        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            app = create_app(self.config)
            self.router = app[ROUTER_KEY]
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
            await runner.setup()  # Router.start: first Endpoints read, then polling
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.started.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
            self.started.set()

    def start(self) -> RouterThread:
        self.thread.start()
        assert self.started.wait(30), "the router never started"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)

    def known(self) -> dict[str, list[str]]:
        """The pool's endpoints per role, read on the router's loop."""
        async def snapshot():
            return {role: sorted(eps) for role, eps in self.router.pool.endpoints.items()}

        return asyncio.run_coroutine_threadsafe(snapshot(), self.loop).result(5)


@pytest.fixture
def services(kube_api, namespace):
    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    for role in ("prefill", "decode"):
        core.create_namespaced_service(namespace, service(f"x-{role}", role))
    apps.create_namespaced_deployment(namespace, deployment("x-prefill", "prefill", 2))
    apps.create_namespaced_deployment(namespace, deployment("x-decode", "decode", 1))
    return core, apps


@pytest.fixture
def kubeconfig_env(kubeconfig, monkeypatch):
    """Not a pod: no in-cluster configuration; the kubeconfig comes from $KUBECONFIG."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return str(kubeconfig)


@pytest.fixture
def ghost_node(kube_api, namespace):
    """A Node no agent serves (tainted so nothing is scheduled there): its pods' status is the test's."""
    core = client.CoreV1Api(kube_api)
    name = f"ghost-{uuid.uuid4().hex[:6]}"
    core.create_node({"metadata": {"name": name},
                      "spec": {"taints": [{"key": "baton.dev/ghost", "effect": "NoSchedule"}]}})
    try:
        yield name
    finally:
        with _suppress_404():
            core.delete_namespaced_pod("x-decode-manual", namespace, grace_period_seconds=0)
        with _suppress_404():
            core.delete_node(name)


class _suppress_404:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return isinstance(exc, client.ApiException) and exc.status == 404


def set_ready(core: client.CoreV1Api, ns: str, name: str, ip: str, ready: bool) -> None:
    flag = "True" if ready else "False"
    core.patch_namespaced_pod_status(name, ns, {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": t, "status": s} for t, s in
                       (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", flag),
                        ("Ready", flag))],
    }})


def endpoints_ips(core: client.CoreV1Api, ns: str, name: str) -> tuple[set[str], set[str]]:
    """(ready, not-ready) addresses of the Endpoints object, as the endpoints controller wrote them."""
    try:
        ep = core.read_namespaced_endpoints(name, ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return set(), set()
        raise
    ready = {a.ip for s in ep.subsets or [] for a in s.addresses or []}
    not_ready = {a.ip for s in ep.subsets or [] for a in s.not_ready_addresses or []}
    return ready, not_ready


def test_discovery_follows_endpoints_of_real_services(services, namespace, kubeconfig_env, ghost_node):
    core, apps = services
    prefill = wait_for("2 prefill pods Ready", lambda: ready_pod_urls(core, namespace, "prefill", 2))
    decode = wait_for("1 decode pod Ready", lambda: ready_pod_urls(core, namespace, "decode", 1))
    assert all(u.startswith("http://10.244.") for u in prefill + decode)

    r = RouterThread(["--prefill-service", "x-prefill", "--decode-service", "x-decode", "--namespace",
                      namespace, "--discovery-interval", "0.2", "--health-interval", "60"]).start()
    try:
        assert r.config.kube_api is not None and r.router.discovery is not None
        assert r.router.discovery.namespace == namespace
        # the pods' IPs at the port named http (not the Service's first port, 9090)
        wait_for("the pool to hold the pods", lambda: r.known() == {"prefill": prefill, "decode": decode,
                                                                    "both": []}, timeout=10)

        def follows(what, role, replicas, timeout=5.0):
            urls = wait_for(f"{replicas} {role} pods Ready", lambda: ready_pod_urls(core, namespace, role,
                                                                                    replicas))
            # the Endpoints controller lags the pods a little; discovery polls every 0.2s
            t0 = time.monotonic()
            wait_for(what, lambda: r.known()[role] == urls, timeout=timeout)
            return urls, time.monotonic() - t0

        apps.patch_namespaced_deployment_scale("x-decode", namespace, {"spec": {"replicas": 3}})
        decode, lag = follows("scale up to 3 decode", "decode", 3)
        assert len(decode) == 3 and lag < 5

        apps.patch_namespaced_deployment_scale("x-prefill", namespace, {"spec": {"replicas": 1}})
        prefill, _ = follows("scale down to 1 prefill", "prefill", 1)
        assert len(prefill) == 1 and r.known()["decode"] == decode

        victim = core.list_namespaced_pod(namespace, label_selector="role=decode").items[0]
        gone = f"http://{victim.status.pod_ip}:{PORT}"
        assert gone in decode
        core.delete_namespaced_pod(victim.metadata.name, namespace)
        wait_for("the deleted pod's endpoint to leave", lambda: gone not in r.known()["decode"], timeout=10)
        decode, _ = follows("the replacement pod", "decode", 3)
        assert gone not in decode and len(decode) == 3

        # not-ready addresses: a selected pod on a node no agent serves, status set here
        ghost_ip = GHOST_IP_PREFIX + f"{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 2}"
        ghost_url = f"http://{ghost_ip}:{PORT}"
        core.create_namespaced_pod(namespace, {
            "metadata": {"name": "x-decode-manual", "labels": {"app": "x", "role": "decode", "owner": "manual"}},
            "spec": {"nodeName": ghost_node, "containers": [{"name": "worker", "image": "baton/test:0"}]},
        })
        set_ready(core, namespace, "x-decode-manual", ghost_ip, ready=False)
        wait_for("the endpoints controller to list the pod as not ready",
                 lambda: ghost_ip in endpoints_ips(core, namespace, "x-decode")[1])
        time.sleep(1.0)  # five discovery polls
        assert r.known()["decode"] == decode, "a not-ready address was discovered"

        set_ready(core, namespace, "x-decode-manual", ghost_ip, ready=True)
        wait_for("the pod to become a ready address", lambda: ghost_url in r.known()["decode"], timeout=10)
        assert r.known()["decode"] == sorted(decode + [ghost_url])

        set_ready(core, namespace, "x-decode-manual", ghost_ip, ready=False)
        wait_for("the pod to leave once not ready", lambda: r.known()["decode"] == decode, timeout=10)
        assert ghost_ip in endpoints_ips(core, namespace, "x-decode")[1]
        assert r.known()["prefill"] == prefill
    finally:
        r.stop()


def test_baton_router_command_discovers_with_kubeconfig(services, namespace, kubeconfig_env):
    """The real `baton router` process: no in-cluster config, $KUBECONFIG -> it logs the pods it found."""
    core, _ = services
    prefill = wait_for("2 prefill pods Ready", lambda: ready_pod_urls(core, namespace, "prefill", 2))
    decode = wait_for("1 decode pod Ready", lambda: ready_pod_urls(core, namespace, "decode", 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())", "router",
         "--prefill-service", "x-prefill", "--decode-service", "x-decode", "--namespace", namespace,
         "--host", "127.0.0.1", "--port", str(port), "--discovery-interval", "0.5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    found: dict[str, set[str]] = {"prefill": set(), "decode": set()}
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while found != {"prefill": set(prefill), "decode": set(decode)}:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            for role, urls in found.items():
                marker = f"discovered {role} worker "
                if marker in line:
                    urls.add(line.split(marker, 1)[1].strip())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
