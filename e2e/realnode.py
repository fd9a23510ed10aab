"""Real Kubernetes nodes beside the local control plane: kubelet + containerd + runc + CNI + kube-proxy.

Each node is a kubelet with its own containerd (own root, state, socket and runc root), its own kubelet
root-dir, cert-dir, ports and cgroup root (``/baton-NAME`` in every hierarchy), and a client certificate
``CN=system:node:NAME, O=system:nodes`` signed by the cluster CA, so the Node authorizer and NodeRestriction
treat it as the real thing. All nodes share the host's network namespace, hence ONE CNI bridge with file-locked
host-local IPAM (pod IPs in :data:`POD_CIDR`, reachable from the host) and ONE kube-proxy in iptables mode
(ClusterIPs work from the host and from pods). Images are never pulled: every node's containerd imports the
locally built OCI archives (:mod:`baton.e2e.images`) before its kubelet starts; the image GC is off.

What this cannot be: several real-node clusters on one host at a time (the bridge, kube-proxy and a few host
paths that kubelet 1.20 and containerd 1.6 hard-code are shared), and a node that dies turning NotReady (the
control plane runs without the node-lifecycle controller). Host changes are recorded before they are made and
undone by :func:`baton.e2e.hostclean.teardown`, which ``baton cluster down`` also runs after a crash.

Pure renderers (:func:`containerd_config`, :func:`kubelet_config`, :func:`cni_conflist`,
:func:`kube_proxy_config`) are separate from the processes that use them, so the configuration is tested
without root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from baton.e2e import hostclean
from baton.e2e.pki import issue_leaf

if TYPE_CHECKING:
    from baton.e2e.cluster import Component, LocalCluster, NodeSpec

POD_CIDR = "10.88.0.0/16"
BRIDGE = "baton-cni0"
CNI_NETWORK = "baton"
PAUSE_IMAGE = "localhost/baton/pause:3.4"
CNI_BIN_DIR = "/usr/lib/cni"
HOST_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack")

Log = Callable[[str], None]


class RealNodeError(RuntimeError):
    """A real node could not be started (the message names the log to read)."""


def host_ip() -> str:
    """The host's address on its default route: the InternalIP of every real node (they share it)."""
    out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], text=True, capture_output=True, check=False).stdout
    words = out.split()
    if "src" not in words:
        raise RealNodeError(f"cannot find the host's default-route address (ip route get said: {out.strip()!r})")
    return words[words.index("src") + 1]


def missing_host_tools() -> list[str]:
    """Host commands real nodes need; ``scripts/setup`` installs them from apt."""
    tools = {
        "containerd": "containerd",
        "ctr": "containerd",
        "runc": "runc",
        "iptables": "iptables",
        "iptables-save": "iptables",
        "conntrack": "conntrack",
    }
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not os.access(f"{CNI_BIN_DIR}/bridge", os.X_OK):
        missing.append("containernetworking-plugins")
    return missing


# ------------------------------------------------------------------------------------------------
# pure configuration


@dataclasses.dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its files (all below ``root``)."""

    root: Path

    @property
    def containerd(self) -> Path:
        return self.root / "containerd"

    @property
    def socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"


def containerd_config(paths: NodePaths, cni_conf_dir: Path, pause_image: str = PAUSE_IMAGE) -> str:
    """containerd 1.6 config (TOML) for one node.

    ``restrict_oom_score_adj``: the CRI gives pause containers oom_score_adj -998, and root in this kind of VM
    lacks CAP_SYS_RESOURCE, so runc would fail every sandbox ("can't get final child's PID from pipe");
    restricted, containerd clamps it to its own score. runc's state lives under the node (the default
    /run/containerd/runc would be shared by all nodes)."""
    c = paths.containerd
    return f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
[grpc]
  address = "{paths.socket}"
[ttrpc]
  address = "{paths.socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{c / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
"""


def cni_conflist(ipam_dir: Path, bridge: str = BRIDGE, subnet: str = POD_CIDR) -> dict[str, Any]:
    """One bridge for all nodes; host-local IPAM is file-locked, so two containerds share it safely."""
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,  # a pod reaching its own Service through kube-proxy
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    paths: NodePaths, cgroup_root: str, port: int, healthz_port: int, ca_file: Path, max_pods: int = 50
) -> dict[str, Any]:
    """KubeletConfiguration for one node.

    Only holders of a certificate from the cluster CA may talk to it (the apiserver has one for logs/exec);
    image GC is off because nothing can be pulled again; the status period is 2 s (the first status after
    registration is NotReady and Ready only comes one period later)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failSwapOn": False,
        "address": "0.0.0.0",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "runtimeRequestTimeout": "5m",
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "maxPods": max_pods,
        "nodeStatusUpdateFrequency": "2s",
        "volumeStatsAggPeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path, hostname: str, metrics_port: int, healthz_port: int) -> dict[str, Any]:
    """One kube-proxy (iptables mode) for all nodes: they share the host's network namespace."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": hostname,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        # never touch the host's conntrack sysctls
        "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
    }


def client_kubeconfig(server: str, ca: Path, crt: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def real_node_specs(count: int) -> list[NodeSpec]:
    """``real-0`` in the prefill pool, ``real-1`` in the decode pool, then alternating; 8 fake GPUs each."""
    from baton.e2e.cluster import ZONES, gpu_node

    pools = ("prefill", "decode")
    return [gpu_node(f"real-{i}", pools[i % 2], ZONES[i % 2]) for i in range(count)]


#: unix sockets (containerd's, the kubelet's pod-resources) must fit in 104 bytes: node files live under a
#: short folder of the cache, not under a deep test run dir
MAX_SOCKET_PATH = 104


def node_root(run_dir: Path) -> Path:
    """Where a cluster's real nodes keep their files: short and unique per cluster run dir."""
    import hashlib

    from baton.e2e.build import cache_root

    return cache_root() / "rn" / hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]


def check_socket_paths(root: Path, names: Sequence[str]) -> None:
    longest = max(
        (
            p
            for n in names
            for p in (
                f"{NodePaths(root / n).socket}.ttrpc",
                f"{NodePaths(root / n).kubelet}/root/pod-resources/kubelet.sock",
            )
        ),
        key=len,
    )
    if len(longest) >= MAX_SOCKET_PATH:
        raise RealNodeError(
            f"unix socket path {longest} is {len(longest)} bytes, over the kernel's limit: "
            "set BATON_CACHE to a shorter folder"
        )


# ------------------------------------------------------------------------------------------------
# processes


class RealNodes:
    """The real nodes of one :class:`~baton.e2e.cluster.LocalCluster` (and the host network they share)."""

    def __init__(
        self,
        cluster: LocalCluster,
        specs: Sequence[NodeSpec],
        images: Sequence[Path],
        log: Log,
        ready_timeout: float = 90.0,
    ) -> None:
        self.cluster = cluster
        self.specs = list(specs)
        self.images = list(images)
        self.log = log
        self.ready_timeout = ready_timeout
        assert cluster.run_dir is not None
        self.root = node_root(cluster.run_dir)
        self.ip = host_ip()
        self.timings: dict[str, float] = {}
        self.kubelet_ports: dict[str, int] = {}

    # -- paths ---------------------------------------------------------------------------------------
    def paths(self, name: str) -> NodePaths:
        return NodePaths(self.root / name)

    @property
    def cni_dir(self) -> Path:
        return self.root / "cni"

    def cgroup_name(self, node: str) -> str:
        return f"baton-{node}"

    # -- start ---------------------------------------------------------------------------------------
    def start(self) -> None:
        missing = missing_host_tools()
        if missing:
            raise RealNodeError(
                f"real nodes need the host packages {', '.join(missing)} (scripts/setup installs them: "
                f"apt-get install {' '.join(HOST_PACKAGES)})"
            )
        if os.geteuid() != 0:
            raise RealNodeError("real nodes run kubelet, containerd and runc as root: run as root")
        from baton.e2e import build as k8sbuild

        check_socket_paths(self.root, [s.name for s in self.specs])
        bins = k8sbuild.ensure_binaries(log=self.log, names=k8sbuild.NODE_BINARIES)
        self.kubelet_bin, self.kube_proxy_bin = bins / "kubelet", bins / "kube-proxy"
        hostclean.record_host(
            self.root,
            BRIDGE,
            CNI_NETWORK,
            POD_CIDR,
            [self.cgroup_name(s.name) for s in self.specs],
            str(self.kube_proxy_bin),
            detached=self.cluster.detached,
            log=self.log,
        )
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_cni()
        t0 = time.monotonic()
        self._start_kube_proxy()
        for spec in self.specs:
            self._start_containerd(spec)
        self.import_images(self.images)
        self.timings["image import"] = time.monotonic() - t0
        for spec in self.specs:
            self._start_kubelet(spec)
        self._wait_ready()
        self.timings["nodes ready"] = time.monotonic() - t0
        self.log(
            f"{len(self.specs)} real node(s) Ready after {self.timings['nodes ready']:.1f}s "
            f"(image import {self.timings['image import']:.1f}s)"
        )

    def _write_cni(self) -> None:
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "cni-ipam").mkdir(exist_ok=True)
        conf = cni_conflist(self.root / "cni-ipam")
        (self.cni_dir / f"10-{CNI_NETWORK}.conflist").write_text(json.dumps(conf, indent=2))

    def _spawn(self, name: str, argv: list[str]) -> Component:
        return self.cluster._spawn(name, argv)

    def _client_creds(self, directory: Path, name: str, subj: str) -> Path:
        """Certificate from the cluster CA + kubeconfig (for a kubelet or kube-proxy)."""
        pki = self.cluster.pki
        assert pki is not None
        crt, key = issue_leaf(pki.dir, name, subj)
        directory.mkdir(parents=True, exist_ok=True)
        for src in (crt, key):
            shutil.copy2(src, directory / src.name.replace(name, "client"))
        kc = directory / "kubeconfig"
        kc.write_text(
            yaml.safe_dump(
                client_kubeconfig(
                    self.cluster.server,
                    pki.ca_crt,
                    directory / "client.crt",
                    directory / "client.key",
                    subj.rsplit("CN=", 1)[1],
                )
            )
        )
        kc.chmod(0o600)
        return kc

    def _start_kube_proxy(self) -> None:
        from baton.worker.local_fleet import free_ports

        d = self.root / "kube-proxy"
        kc = self._client_creds(d, "kube-proxy", "/CN=system:kube-proxy")  # RBAC: system:node-proxier
        metrics, healthz = free_ports(2)
        cfg = d / "config.yaml"
        cfg.write_text(yaml.safe_dump(kube_proxy_config(kc, self.specs[0].name, metrics, healthz)))
        self._spawn("kube-proxy", [str(self.kube_proxy_bin), f"--config={cfg}", "--v=1"])

    def _start_containerd(self, spec: NodeSpec) -> None:
        p = self.paths(spec.name)
        p.containerd.mkdir(parents=True, exist_ok=True)
        cfg = p.containerd / "config.toml"
        cfg.write_text(containerd_config(p, self.cni_dir))
        comp = self._spawn(f"containerd-{spec.name}", ["containerd", "--config", str(cfg)])
        self.cluster._wait(
            f"containerd of {spec.name}",
            comp,
            lambda: subprocess.run(
                ["ctr", "-a", str(p.socket), "version"], capture_output=True, timeout=5, check=False
            ).returncode
            == 0,
            30,
        )

    def import_images(self, archives: Sequence[Path]) -> None:
        """Load image archives into every node's containerd (all nodes at once: I/O bound). Also for an image
        only some tests need (the vLLM image, GBs), imported when they first ask for it."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(self.specs)) as pool:
            list(pool.map(lambda spec: self._import_into(spec, archives), self.specs))

    def _import_into(self, spec: NodeSpec, archives: Sequence[Path]) -> None:
        sock = str(self.paths(spec.name).socket)
        for image in archives:
            proc = subprocess.run(
                ["ctr", "-a", sock, "-n", "k8s.io", "images", "import", str(image)],
                text=True,
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RealNodeError(f"importing {image} into {spec.name}'s containerd failed: {proc.stderr[-800:]}")

    def _start_kubelet(self, spec: NodeSpec) -> None:
        from baton.worker.local_fleet import free_ports

        assert self.cluster.pki is not None
        p = self.paths(spec.name)
        kdir = p.kubelet
        kc = self._client_creds(kdir, f"node-{spec.name}", f"/O=system:nodes/CN=system:node:{spec.name}")
        cgroup = self.cgroup_name(spec.name)
        for h in hostclean.cgroup_hierarchies():
            (h / cgroup).mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():  # a cpuset cgroup takes no task until cpus/mems are set
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (h / cgroup / f).write_text((h / f).read_text())
        port, healthz = free_ports(2)
        self.kubelet_ports[spec.name] = port
        cfg = kdir / "config.yaml"
        cfg.write_text(
            yaml.safe_dump(kubelet_config(p, f"/{cgroup}", port, healthz, self.cluster.pki.ca_crt), sort_keys=False)
        )
        labels = ",".join(f"{k}={v}" for k, v in spec.labels.items())
        self._spawn(
            f"kubelet-{spec.name}",
            [
                str(self.kubelet_bin),
                f"--config={cfg}",
                f"--kubeconfig={kc}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{p.socket}",
                f"--pod-infra-container-image={PAUSE_IMAGE}",
                f"--containerd={p.socket}",
                f"--hostname-override={spec.name}",
                f"--node-ip={self.ip}",
                f"--root-dir={kdir / 'root'}",
                f"--cert-dir={kdir / 'pki'}",
                f"--node-labels={labels}",
                "--v=1",
            ],
        )

    def _wait_ready(self) -> None:
        core = self.cluster._core()
        names = {s.name for s in self.specs}
        deadline = time.monotonic() + self.ready_timeout
        ready: set[str] = set()
        while time.monotonic() < deadline:
            for name in names - ready:
                comp = self.cluster.components.get(f"kubelet-{name}")
                if comp is not None and not comp.running():
                    raise RealNodeError(f"kubelet of {name} exited; last lines of {comp.log_path}:\n{comp.log_tail()}")
                with contextlib.suppress(Exception):
                    node = core.read_node(name)
                    if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []):
                        self._finish_node(name)
                        ready.add(name)
            if ready == names:
                return
            time.sleep(0.3)
        logs = "\n".join(
            f"== {c.log_path}\n{c.log_tail(15)}"
            for n in names - ready
            if (c := self.cluster.components.get(f"kubelet-{n}")) is not None
        )
        raise RealNodeError(f"real nodes {sorted(names - ready)} not Ready after {self.ready_timeout:.0f}s\n{logs}")

    def _finish_node(self, name: str) -> None:
        """Fake GPUs the documented way for extended resources (a JSON patch of node status), and lift the
        not-ready taint: nothing else would (the node-lifecycle controller is off in this control plane)."""
        core = self.cluster._core()
        spec = next(s for s in self.specs if s.name == name)
        if spec.gpus:
            core.patch_node_status(
                name,
                [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(spec.gpus)}],
            )
        from baton.e2e.cluster import lift_condition_taints

        lift_condition_taints(core, name)

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop everything and undo the host changes (from the record, like ``baton cluster down``)."""
        for key in [k for k in self.cluster.components if k.startswith(("kubelet-", "containerd-", "kube-proxy"))]:
            self.cluster.components.pop(key, None)  # hostclean stops them in the right order
        rec = hostclean.read_record()
        if rec is None or rec.root != str(self.root):
            return []
        return hostclean.teardown(rec, log=self.log)
