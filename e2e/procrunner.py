"""Run a pod's container command as a local process: a :class:`~baton.e2e.agent.PodRunner` for the node agent.

There is no container runtime on the local cluster, so a test that needs a pod to really *do* something (the
Helm-installed operator reconciling LLMServices) plugs this runner into the node agent. For each matching pod
it emulates what a kubelet would give the container:

* the pod's ``secret`` volumes (including the ServiceAccount token volume that 1.20 injects) are written to a
  private directory, and every argument that starts with a volume's ``mountPath`` is rewritten to point there;
* the credentials are *the pod's own ServiceAccount token*: a kubeconfig (cluster server + CA + that token)
  is written next to them and given as ``$KUBECONFIG`` (in-cluster config reads fixed paths under
  /var/run/secrets, which a local process cannot have; the kubeconfig carries the same identity). The
  environment variable, not ``--kubeconfig``: the kubernetes client freezes its default kubeconfig path
  from ``$KUBECONFIG`` when it is imported, before the CLI could set it;
* ``env`` with literal values and ``fieldRef`` metadata.namespace/name/spec.serviceAccountName;
* the command ``baton`` is this interpreter's ``python -m baton.cli``.

``rewrite_args`` adapts the rest of the pod's network identity (its Service DNS name and ports are not
reachable from the apiserver here): it gets and returns the argument list.
"""
from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("baton.e2e.procrunner")

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class ProcessPodRunner:
    """Runs matching pods' first container as a child process; delegates the other pods to ``fallback``."""

    def __init__(self, cluster: Any, match: Callable[[dict], bool], *,
                 rewrite_args: Callable[[list[str]], list[str]] | None = None,
                 fallback: Any = None, workdir: str | os.PathLike[str] | None = None) -> None:
        self.cluster = cluster
        self.match = match
        self.rewrite_args = rewrite_args or (lambda argv: argv)
        self.fallback = fallback
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="baton-pods-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.argv: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    # -- PodRunner -------------------------------------------------------------------------------
    def start(self, pod: dict[str, Any]) -> None:
        if not self.match(pod):
            if self.fallback is not None:
                self.fallback.start(pod)
            return
        meta = pod["metadata"]
        uid, name, ns = meta["uid"], meta["name"], meta["namespace"]
        root = self.workdir / f"{ns}_{name}"
        root.mkdir(parents=True, exist_ok=True)
        mounts = self._materialize_secrets(pod, root)
        token_dir = mounts.get(SA_MOUNT)
        if token_dir is None:
            raise RuntimeError(f"pod {ns}/{name} has no ServiceAccount token volume mounted at {SA_MOUNT}")
        kubeconfig = self._kubeconfig(root, (token_dir / "token").read_text().strip())

        container = pod["spec"]["containers"][0]
        command = list(container.get("command") or [])
        if command[:1] == ["baton"]:
            command = [sys.executable, "-m", "baton.cli", *command[1:]]
        args = [_remap(a, mounts) for a in container.get("args") or []]
        argv = command + self.rewrite_args(args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(self._env(pod, container))
        env["KUBECONFIG"] = str(kubeconfig)
        log_path = root / "container.log"
        with self._lock:
            self.logs[uid], self.argv[uid] = log_path, argv
            self.procs[uid] = subprocess.Popen(argv, env=env, stdout=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
                                               stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
        log.info("started %s/%s as pid %s: %s", ns, name, self.procs[uid].pid, " ".join(argv))

    def stop(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            proc = self.procs.pop(uid, None)
        if proc is None:
            if self.fallback is not None:
                self.fallback.stop(pod)
            return
        _terminate(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            _terminate(proc)

    def log_tail(self, lines: int = 80) -> str:
        parts = []
        for uid, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- pod {uid}: {' '.join(self.argv.get(uid, []))}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- helpers ---------------------------------------------------------------------------------
    def _materialize_secrets(self, pod: dict, root: Path) -> dict[str, Path]:
        """Write each secret volume's keys under root/<mountPath>; returns {mountPath: local dir}."""
        from kubernetes import client

        core = client.CoreV1Api(self.cluster.api_client())
        ns = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out: dict[str, Path] = {}
        for mount in pod["spec"]["containers"][0].get("volumeMounts") or []:
            volume = volumes.get(mount["name"]) or {}
            if "secret" not in volume:
                continue
            secret = core.read_namespaced_secret(volume["secret"]["secretName"], ns)
            local = root / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            for key, value in (secret.data or {}).items():
                (local / key).write_bytes(base64.b64decode(value))
                (local / key).chmod(0o600)
            out[mount["mountPath"]] = local
        return out

    def _kubeconfig(self, root: Path, token: str) -> Path:
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.cluster.server,
                                                       "certificate-authority": str(self.cluster.pki.ca_crt)}}],
            "users": [{"name": "pod-service-account", "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "local", "user": "pod-service-account"}}],
            "current-context": "pod",
        }
        path = root / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)
        return path

    @staticmethod
    def _env(pod: dict, container: dict) -> dict[str, str]:
        fields = {"metadata.namespace": pod["metadata"]["namespace"], "metadata.name": pod["metadata"]["name"],
                  "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default")}
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                ref = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
                if ref in fields:
                    env[item["name"]] = fields[ref]
        return env


def _remap(arg: str, mounts: dict[str, Path]) -> str:
    for mount_path, local in mounts.items():
        for prefix in (f"={mount_path}/", ""):
            if prefix and prefix in arg:
                return arg.replace(prefix, f"={local}/", 1)
        if arg.startswith(mount_path + "/"):
            return str(local) + arg[len(mount_path):]
    return arg


def _terminate(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
