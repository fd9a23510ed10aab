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

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import yaml
from baton.e2e.cluster import free_port

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"


class PrometheusNotInstalled(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class KubernetesPods:
    """Scrape the pods Baton's operator made, found through the apiserver (Kubernetes service discovery, role
    pod), as the chart's PodMonitor does: port `http`, and the labels `llmservice`, `role`, `namespace` from the
    pods' own labels (vLLM's series carry none)."""

    api_server: str
    ca_file: str
    cert_file: str
    key_file: str

    def scrape_config(self, honor_labels: bool = True) -> dict:
        from baton.operator.labels import LABEL_LLMSERVICE, LABEL_MANAGED_BY, LABEL_ROLE, MANAGED_BY

        from baton import launch

        def meta(label: str) -> str:
            return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)

        tls = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        return {
            "job_name": "kubernetes-pods",
            "honor_labels": honor_labels,
            "kubernetes_sd_configs": [{"role": "pod", "api_server": self.api_server, "tls_config": tls}],
            "relabel_configs": [
                {"source_labels": [meta(LABEL_MANAGED_BY)], "regex": MANAGED_BY, "action": "keep"},
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
                {"source_labels": [meta(LABEL_LLMSERVICE)], "target_label": launch.Label.LLMSERVICE},
                {"source_labels": [meta(LABEL_ROLE)], "target_label": launch.Label.ROLE},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": launch.Label.NAMESPACE},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ],
        }


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
