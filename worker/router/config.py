"""The router's configuration (built from `baton router`'s flags by `cli.py`, or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from baton.worker.router.policy import DEFAULT_PREFIX_CHARS
from baton.worker.router.pool import DEFAULT_HEALTH_PATH
from baton.worker.router.prefill_failure import HEADROOM_WINDOW, PrefillFailurePolicy

from baton import launch

#: How long a request waits for a serving worker when there is none (`--worker-wait`).
#: 60 s covers a decode pod's replacement starting and loading a small model (measured: about 25 s on a busy
#: 2-core node); a client sees latency, not an error. Larger models: raise it, or run two decode replicas.
DEFAULT_WORKER_WAIT = 60.0


@dataclass
class RouterConfig:
    policy: str = "least-loaded"
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)
    namespace: str | None = None  # Kubernetes namespace of the Services
    prefill_service: str | None = None
    decode_service: str | None = None
    both_service: str | None = None
    health_interval: float = launch.ROUTER_HEALTH_INTERVAL_SECONDS
    # timeout and failure/success thresholds of the health checks: the kubelet's readiness numbers
    health: launch.HealthTiming = launch.WORKER_READINESS
    health_path: str = DEFAULT_HEALTH_PATH  # GET on each worker: /ready (Baton), /health (vLLM)
    discovery_interval: float = 2.0
    connect_timeout: float = 5.0
    hop_timeout: float | None = 60.0  # seconds until a worker's response headers (0/None: no limit)
    stream_idle_timeout: float | None = 60.0  # seconds without a byte of the response body (0/None: no limit)
    worker_wait: float = DEFAULT_WORKER_WAIT  # seconds a request waits for a serving worker when there is none
    max_attempts: int = 3
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    llmservice: str | None = None  # metric labels (default: env BATON_LLMSERVICE / BATON_NAMESPACE)
    metrics_namespace: str | None = None
    seed: int | None = None
    kube_api: Any = None  # a CoreV1Api-like object (tests); default: in-cluster config or kubeconfig
    prefill_failure: PrefillFailurePolicy = field(default_factory=PrefillFailurePolicy)
    headroom_window: float = HEADROOM_WINDOW  # seconds of TPOTs the `whenHeadroom` decision reads
    kv_announce: bool = False  # ask Baton prefill workers to announce the KV before the prefill ends (announce.py)
    otlp_traces_endpoint: str | None = None  # OpenTelemetry traces (OTLP/HTTP, `tracing.py`); None: no tracing

    def services(self) -> dict[str, str]:
        return {
            role: name
            for role, name in (
                ("prefill", self.prefill_service),
                ("decode", self.decode_service),
                ("both", self.both_service),
            )
            if name
        }
