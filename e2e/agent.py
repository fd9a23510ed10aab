"""A stand-in for the kubelet on the local cluster's fake nodes.

There is no container runtime: the agent watches pods and, for every pod bound to one of *its* nodes,

* marks it Running/Ready (``podIP`` unique per pod from a fake range, ``containerStatuses``, conditions);
* force-deletes it (grace period 0) once it carries a ``deletionTimestamp`` -- without a kubelet nothing
  else would, and the pod would stay Terminating forever;
* keeps the nodes' ``Ready`` condition heartbeat fresh.

A :class:`PodRunner` may be plugged in to actually run a pod's command as a local process later
(``start`` before the pod is reported Running, ``stop`` before it is force-deleted); the default runs
nothing. The agent runs as background threads (:meth:`NodeAgent.start`) or as its own process
(``python -m baton.e2e.agent --kubeconfig ... --node NAME ...``) for detached clusters.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("baton.e2e.agent")

POD_CIDR = "10.244.0.0/16"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRunner(Protocol):
    """Hook for running pods' workloads; both methods get the pod as a plain dict (API JSON)."""

    def start(self, pod: dict[str, Any]) -> None: ...

    def stop(self, pod: dict[str, Any]) -> None: ...


class NoopRunner:
    def start(self, pod: dict[str, Any]) -> None:
        return None

    def stop(self, pod: dict[str, Any]) -> None:
        return None


class IpAllocator:
    """Hands out unique addresses from ``cidr`` (skipping network/.0/.1 addresses), per pod UID."""

    def __init__(self, cidr: str = POD_CIDR):
        self._hosts = (
            str(ip) for ip in ipaddress.ip_network(cidr).hosts() if ip.packed[-1] not in (0, 1, 255)
        )
        self._by_uid: dict[str, str] = {}
        self._used: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, uid: str, ip: str) -> None:
        with self._lock:
            self._by_uid[uid] = ip
            self._used.add(ip)

    def get(self, uid: str) -> str:
        with self._lock:
            if uid in self._by_uid:
                return self._by_uid[uid]
            for ip in self._hosts:
                if ip not in self._used:
                    self._used.add(ip)
                    self._by_uid[uid] = ip
                    return ip
            raise RuntimeError(f"pod IP range {POD_CIDR} exhausted")

    def release(self, uid: str) -> None:
        with self._lock:
            self._by_uid.pop(uid, None)  # never reused: stale endpoints cannot point at a new pod


def running_status(pod: dict[str, Any], pod_ip: str, host_ip: str, ts: str) -> dict[str, Any]:
    """The ``status`` a kubelet would report for a started, ready pod."""
    spec = pod.get("spec") or {}
    uid = pod["metadata"]["uid"]
    start_time = (pod.get("status") or {}).get("startTime") or ts

    def cstatus(c: dict[str, Any], running: bool) -> dict[str, Any]:
        state = (
            {"running": {"startedAt": ts}}
            if running
            else {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": ts, "finishedAt": ts}}
        )
        return {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": f"baton://{c.get('image', '')}",
            "containerID": f"baton://{uid}/{c['name']}",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "state": state,
        }

    status: dict[str, Any] = {
        "phase": "Running",
        "hostIP": host_ip,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "qosClass": (pod.get("status") or {}).get("qosClass") or "BestEffort",
        "conditions": [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [cstatus(c, True) for c in spec.get("containers") or []],
    }
    if spec.get("initContainers"):
        status["initContainerStatuses"] = [cstatus(c, False) for c in spec["initContainers"]]
    return status


def is_running_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or not st.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


class NodeAgent:
    """Fake kubelet for ``nodes`` (``{name: InternalIP}``), talking to the API through ``api_client_factory``."""

    def __init__(
        self,
        api_client_factory,
        nodes: dict[str, str],
        runner: PodRunner | None = None,
        heartbeat_interval: float = 10.0,
        resync_interval: float = 30.0,
    ):
        self._factory = api_client_factory
        self.nodes = dict(nodes)
        self.runner: PodRunner = runner or NoopRunner()
        self.heartbeat_interval = heartbeat_interval
        self.resync_interval = resync_interval
        self.ips = IpAllocator()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started: set[str] = set()  # pod UIDs handed to the runner
        self.errors: list[str] = []  # last errors, for diagnostics
        self.reconciled = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._pod_loop, "pods"), (self._heartbeat_loop, "heartbeat")):
            t = threading.Thread(target=target, name=f"baton-node-agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _note_error(self, msg: str) -> None:
        log.warning("%s", msg)
        self.errors = (self.errors + [msg])[-20:]

    # -- pods --------------------------------------------------------------------------------------
    def _pod_loop(self) -> None:
        api = client.CoreV1Api(self._factory())
        while not self._stop.is_set():
            try:
                listing = api.list_pod_for_all_namespaces(_preload_content=False)
                body = _json(listing)
                for pod in body.get("items") or []:
                    self.reconcile(api, pod)
                rv = body["metadata"]["resourceVersion"]
                deadline = time.monotonic() + self.resync_interval
                while not self._stop.is_set() and time.monotonic() < deadline:
                    w = watch.Watch()
                    for event in w.stream(
                        api.list_pod_for_all_namespaces,
                        resource_version=rv,
                        timeout_seconds=2,
                        allow_watch_bookmarks=True,
                        _request_timeout=10,
                    ):
                        obj = event["raw_object"]
                        if event["type"] == "ERROR":
                            raise _Relist(str(obj))
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.reconcile(api, obj)
                        elif event["type"] == "DELETED":
                            self._forget(obj)
                        if self._stop.is_set():
                            w.stop()
                            break
            except _Relist:
                continue
            except ApiException as exc:
                if exc.status != 410:
                    self._note_error(f"pod watch: {exc.status} {exc.reason}")
                    self._stop.wait(0.5)
            except Exception as exc:  # noqa: BLE001 - keep going whatever happens; the API may restart
                if self._stop.is_set():
                    break
                self._note_error(f"pod loop: {type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def _forget(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"].get("uid")
        if uid in self._started:
            self._started.discard(uid)
            try:
                self.runner.stop(pod)
            except Exception as exc:  # noqa: BLE001 - a runner bug must not stop the agent
                self._note_error(f"runner.stop {pod['metadata'].get('name')}: {exc}")
        self.ips.release(uid)

    def reconcile(self, api: client.CoreV1Api, pod: dict[str, Any]) -> None:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        host_ip = self.nodes.get(node) if node else None
        if host_ip is None:
            return
        meta = pod["metadata"]
        name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
        self.reconciled += 1
        if meta.get("deletionTimestamp"):
            self._forget(pod)
            try:
                api.delete_namespaced_pod(
                    name,
                    ns,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": uid}),
                )
            except ApiException as exc:
                if exc.status not in (404, 409):
                    self._note_error(f"force-delete {ns}/{name}: {exc.status} {exc.reason}")
            return
        if is_running_ready(pod):
            ip = (pod.get("status") or {}).get("podIP")
            if ip and not spec.get("hostNetwork"):
                self.ips.reserve(uid, ip)
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        pod_ip = host_ip if spec.get("hostNetwork") else self.ips.get(uid)
        if uid not in self._started:
            try:
                self.runner.start(pod)
            except Exception as exc:  # noqa: BLE001 - a runner bug must not stop the agent
                self._note_error(f"runner.start {ns}/{name}: {exc}")
                return
            self._started.add(uid)
        try:
            api.patch_namespaced_pod_status(
                name, ns, {"status": running_status(pod, pod_ip, host_ip, now_iso())}
            )
        except ApiException as exc:
            if exc.status != 404:
                self._note_error(f"patch status {ns}/{name}: {exc.status} {exc.reason}")

    # -- nodes -------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        api = client.CoreV1Api(self._factory())
        while not self._stop.is_set():
            for node in list(self.nodes):
                try:
                    heartbeat(api, node)
                except Exception as exc:  # noqa: BLE001 - retried on the next beat
                    if self._stop.is_set():
                        return
                    self._note_error(f"heartbeat {node}: {type(exc).__name__}: {exc}")
            self._stop.wait(self.heartbeat_interval)


class _Relist(Exception):
    pass


def _json(resp) -> dict[str, Any]:
    import json

    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def node_conditions(ts: str, transition: str | None = None) -> list[dict[str, Any]]:
    transition = transition or ts
    ok = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    return [
        {
            "type": t,
            "status": s,
            "reason": r,
            "message": "baton node agent",
            "lastHeartbeatTime": ts,
            "lastTransitionTime": transition,
        }
        for t, s, r in ok
    ]


def heartbeat(api: client.CoreV1Api, node: str) -> None:
    """Refresh ``lastHeartbeatTime`` of the node's conditions (transition times are kept)."""
    current = api.read_node_status(node)
    transition = None
    for c in current.status.conditions or []:
        if c.type == "Ready" and c.status == "True" and c.last_transition_time:
            transition = c.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    api.patch_node_status(node, {"status": {"conditions": node_conditions(now_iso(), transition)}})


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton.e2e.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", action="append", default=[], metavar="NAME=IP", required=True)
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    nodes = dict(n.split("=", 1) for n in args.node)
    agent = NodeAgent(lambda: config.new_client_from_config(config_file=args.kubeconfig), nodes)
    signal.signal(signal.SIGTERM, lambda *_: agent._stop.set())
    log.info("node agent for %s", ", ".join(nodes))
    try:
        agent.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
