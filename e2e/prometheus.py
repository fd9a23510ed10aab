"""A real Prometheus server for tests: Debian's `prometheus` binary on a loopback port, run as a child process.

Install once with `apt-get install -y --no-install-recommends prometheus` (the package's systemd unit does
not start in a container; the tests never use it: they run the binary themselves with a generated config,
their own TSDB directory and a free port). `LocalPrometheus` scrapes the targets it is given (`host:port`
of `/metrics` endpoints) every `scrape_interval`; targets can be changed while it runs (the config is
rewritten and reloaded through `/-/reload`).

    with LocalPrometheus(tmp_path, targets=["127.0.0.1:9100"]) as prom:
        prom.wait_for_targets()
        prom.url  # http://127.0.0.1:<port>

The pytest fixture `local_prometheus` (in `baton.e2e.fixtures`) gives a started one per test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

import yaml
from baton.worker.local_fleet import free_port

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"


class PrometheusNotInstalled(RuntimeError):
    pass


class KubernetesPods:
    """Kubernetes pod discovery for the pods Baton's operator made, as the chart's PodMonitor selects them:
    port `http`, and the labels `llmservice`, `role`, `namespace` copied from the pods' own labels (vLLM's
    series carry none).

    Debian's Prometheus is built without `kubernetes_sd_configs` ("field kubernetes_sd_configs not found"), so
    this does the discovery itself: a thread lists the pods from the apiserver every `interval` seconds and
    writes them as a `file_sd_configs` target file, which Prometheus re-reads on change. Same inputs (the
    apiserver's pods), same labels, a file in between."""

    def __init__(self, api_client_factory: Any, path: Path, interval: float = 2.0) -> None:
        self.api_client_factory = api_client_factory  # () -> kubernetes.client.ApiClient (admin)
        self.path = Path(path)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def scrape_config(self, honor_labels: bool = True) -> dict:
        return {"job_name": "kubernetes-pods", "honor_labels": honor_labels,
                "file_sd_configs": [{"files": [str(self.path)], "refresh_interval": "5s"}]}

    @staticmethod
    def targets(pods: list[dict]) -> list[dict]:
        """file_sd entries for running pods of ours, on the port the PodMonitor scrapes for their role and engine
        (`launch.scrape_port_name`: a router's and a Baton worker's metrics port, a vLLM worker's http port).
        Pure."""
        from baton.operator.labels import (
            LABEL_ENGINE,
            LABEL_LLMSERVICE,
            LABEL_MANAGED_BY,
            LABEL_ROLE,
            MANAGED_BY,
        )

        from baton import launch

        out = []
        for pod in pods:
            meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
            labels = meta.get("labels") or {}
            if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or not status.get("podIP"):
                continue
            if status.get("phase") != "Running" or meta.get("deletionTimestamp"):
                continue
            name = launch.scrape_port_name(labels.get(LABEL_ROLE, ""), labels.get(LABEL_ENGINE))
            ports = [p["containerPort"] for c in spec.get("containers") or [] for p in c.get("ports") or []
                     if p.get("name") == name]
            for port in ports:
                out.append({"targets": [f"{status['podIP']}:{port}"], "labels": {
                    launch.Label.LLMSERVICE: labels.get(LABEL_LLMSERVICE, ""),
                    launch.Label.ROLE: labels.get(LABEL_ROLE, ""),
                    launch.Label.NAMESPACE: meta.get("namespace", ""),
                    "pod": meta.get("name", ""),
                }})
        return out

    def refresh(self, api: Any) -> None:
        from kubernetes import client

        core = client.CoreV1Api(api)
        pods = api.sanitize_for_serialization(core.list_pod_for_all_namespaces().items)
        text = json.dumps(self.targets(pods), sort_keys=True)
        if not self.path.exists() or self.path.read_text() != text:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.path)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        api = self.api_client_factory()
        self.refresh(api)

        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.refresh(api)
                except Exception as exc:  # noqa: BLE001 - a failed list keeps the last targets; next one retries
                    self.last_error = repr(exc)
            api.close()

        self._thread = threading.Thread(target=loop, daemon=True, name="baton-pod-discovery")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def prometheus_binary() -> str:
    """The `prometheus` executable: $BATON_PROMETHEUS, else `prometheus` on PATH (Debian: /usr/bin)."""
    explicit = os.environ.get("BATON_PROMETHEUS")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise PrometheusNotInstalled(f"BATON_PROMETHEUS={explicit} is not an executable")
        return explicit
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusNotInstalled(f"the prometheus server binary is not installed; run `{INSTALL_HINT}`")
    return found


class LocalPrometheus:
    """One Prometheus server process with a generated config (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike[str], targets: Iterable[str] = (), *,
                 scrape_interval: str = "1s", port: int | None = None, job: str = "baton",
                 honor_labels: bool = True, listen: str = "127.0.0.1",
                 kubernetes: KubernetesPods | None = None) -> None:
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.listen = listen  # the host's address when pods (e.g. the operator's autoscaler) query it
        self.kubernetes = kubernetes
        self.scrape_interval, self.job, self.honor_labels = scrape_interval, job, honor_labels
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    def config(self) -> dict:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "scrape_configs": [{
                "job_name": self.job,
                # Keep the exporters' own `namespace`/`llmservice`/`role` labels as they are.
                "honor_labels": self.honor_labels,
                "static_configs": [{"targets": list(self.targets)}] if self.targets else [],
            }] + ([self.kubernetes.scrape_config(self.honor_labels)] if self.kubernetes else []),
        }

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        tmp.replace(self.config_path)

    def start(self, timeout: float = 30.0) -> LocalPrometheus:
        binary = prometheus_binary()
        if self.kubernetes is not None:
            self.kubernetes.start()
        self._write_config()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address={self.listen}:{self.port}", "--web.enable-lifecycle",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if self._get("/-/ready", raw=True) is not None:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready within {timeout:.0f}s; log:\n{self.log_tail()}")

    def _get(self, path: str, raw: bool = False, timeout: float = 5.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def set_targets(self, targets: Iterable[str]) -> None:
        """Replace the scrape targets; a running server reloads its config."""
        self.targets = list(targets)
        self._write_config()
        if self.running:
            request = urllib.request.Request(self.url + "/-/reload", method="POST")
            with urllib.request.urlopen(request, timeout=10):
                pass

    def add_target(self, target: str) -> None:
        self.set_targets([*self.targets, target])

    def active_targets(self) -> list[dict]:
        return self._get("/api/v1/targets?state=active")["data"]["activeTargets"]

    def wait_for_targets(self, timeout: float = 30.0, scrapes: int = 1) -> None:
        """Wait until every configured target is up and has been scraped at least `scrapes` more times."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        counts: dict[str, int] = {}
        last: object = None
        while time.monotonic() < deadline:
            try:
                active = {t["labels"].get("instance", ""): t for t in self.active_targets()}
                for target in self.targets:
                    t = active.get(target)
                    if t and t.get("health") == "up" and t.get("lastScrape") != seen.get(target):
                        if target in seen:
                            counts[target] = counts.get(target, 0) + 1
                        seen[target] = t["lastScrape"]
                last = {k: (v.get("health"), v.get("lastError")) for k, v in active.items()}
                if all(counts.get(target, 0) >= scrapes for target in self.targets):
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"prometheus targets {self.targets} not scraped {scrapes}x within {timeout:.0f}s: {last}")

    def query(self, promql: str) -> list[dict]:
        """An instant query's result list (raw API form), for assertions."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return body["data"]["result"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash, as far as clients can tell)."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.kubernetes is not None:
            self.kubernetes.stop()
        if self.running:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(self, *_: object) -> None:
        self.stop()
