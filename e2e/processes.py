"""Helpers for whole-system tests: waiting on a condition, and `baton operator run` as a child process.

Tests run the operator exactly as a user would (a separate process), so CLI wiring, the webhook's TLS and
restarts are covered too; this module keeps the one way of doing it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from baton.worker.local_fleet import free_port
from baton.worker.router.pool import all_workers_seen

#: The default polling of `wait_for`: first after POLL_FIRST seconds, each pause POLL_GROWTH times the last, at most
#: POLL_MAX. A condition met at once is seen at once; a pod that takes minutes costs a poll a second, not three:
#: each poll of a real-node test is a `kubectl` process (~0.1 CPU-s) and an apiserver LIST, and on CI's two
#: loaded cores a fixed 0.3 s poll of the many minutes-long waits spent CPU the pods being waited for needed.
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.1, 1.5, 1.0


def poll_pauses(interval: float | None = None) -> Iterator[float]:
    """The pauses between polls: `interval` every time, or (None) the default growing ones. Pure."""
    pause = POLL_FIRST if interval is None else interval
    while True:
        yield pause
        if interval is None:
            pause = min(pause * POLL_GROWTH, POLL_MAX)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float | None = None,
             diagnostics: Callable[[], str] = lambda: "") -> Any:
    """Poll `check` until it returns something truthy (and not an exception) and return that.

    Polls every `interval` seconds, or by default sooner at first and then once a second (`poll_pauses`).
    Exceptions count as "not yet" (the object may not exist yet). On timeout the assertion names what was
    awaited, the last value seen, and `diagnostics()` (e.g. a log tail).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    for pause in poll_pauses(interval):
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001  not there yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(pause, left))
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}\n{diagnostics()}")


class OperatorProcess:
    """`baton operator run -A` as a child process in its own process group, its output kept in a log file."""

    def __init__(self, kubeconfig: str, log_path: Path, *, metrics: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.webhook_port = free_port()
        self.metrics_port = free_port() if metrics else 0
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, kubeconfig_flag: bool = False) -> None:
        """Start; with `kubeconfig_flag`, the kubeconfig comes from `--kubeconfig` and $KUBECONFIG is unset."""
        env = os.environ | {"KUBECONFIG": self.kubeconfig, "OMP_NUM_THREADS": "1"}
        args = ["--webhook-port", str(self.webhook_port), "--webhook-listen", "127.0.0.1",
                "--webhook-host", "127.0.0.1", "--liveness", "", "--metrics-port", str(self.metrics_port),
                "--metrics-listen", "127.0.0.1", *self.extra_args]
        if kubeconfig_flag:
            env.pop("KUBECONFIG")
            args += ["--kubeconfig", self.kubeconfig]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "operator", "run", "-A", *args],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "operator log:\n" + "\n".join(lines[-n:])

    def webhook_registered(self) -> bool:
        """Whether the admission webhook configuration `baton.dev` points at THIS operator (a test's earlier
        operator may have left its own registered)."""
        from baton.e2e.fixtures import api_get

        config = api_get("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/baton.dev",
                         kubeconfig=self.kubeconfig)
        return config is not None and str(self.webhook_port) in config["webhooks"][0]["clientConfig"].get("url", "")

    def wait_webhook_registered(self, timeout: float = 60.0) -> None:
        """Wait until this operator registered its admission webhook (it serves LLMService writes from then on)."""
        wait_for("the operator to register its admission webhook", self.webhook_registered,
                 timeout=timeout, diagnostics=self.log_tail)


def _is_router(ready_body: Any) -> bool:
    return isinstance(ready_body, dict) and "workers" in ready_body


def wait_until_ready(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `base`/ready until it answers 200 -- for a router: and reports every worker healthy
    (`all_workers_seen`), so no first request is recomputed on decode because the router had not yet checked
    the prefill workers; fail at once, with the process's output, if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pipe = proc.stdout or proc.stderr
            output = pipe.read()[-3000:] if pipe else ""
            raise AssertionError(f"{base}: process exited with {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as response:
                body = json.loads(response.read() or b"null") if response.status == 200 else None
                if response.status == 200 and (not _is_router(body) or all_workers_seen(body)):
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{base} never became ready within {timeout:.0f}s")
        time.sleep(0.1)


@contextlib.contextmanager
def worker_process(model_dir: str | os.PathLike[str], *args: str, served_model_name: str = "tiny",
                   ready_timeout: float = 120.0) -> Iterator[str]:
    """A real `baton worker` on a free loopback port; yields its base URL once /ready answers 200.

    Stopped with SIGINT (the clean shutdown path) and killed if it does not exit within 30 s.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "worker", "--model", str(model_dir), "--port", str(port),
         "--served-model-name", served_model_name, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    try:
        wait_until_ready(base, proc, ready_timeout)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def https_server(host: str, answer: Callable[[str, str | None], tuple[int, bytes]],
                 cert: Path, key: Path) -> Iterator[str]:
    """A threaded HTTPS server on `host` (port chosen by the kernel) for tests that download from one:
    `answer(path, authorization_header) -> (status, body)` decides each GET. Yields its base URL."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answer(self.path.split("?")[0], self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"https://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
