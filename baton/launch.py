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
import json
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
    VLLM_NIXL_SIDE_CHANNEL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
    VLLM_NIXL_SIDE_CHANNEL_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT"


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
    # vLLM
    KV_TRANSFER_CONFIG = "--kv-transfer-config"


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
    ROUTER_TTFT = "baton_router_ttft_seconds"
    ROUTER_TPOT = "baton_router_tpot_seconds"


class Label:
    """Metric label names shared by the workers, the router, the PodMonitor relabelling and the autoscaler's
    queries (pod label ``baton.dev/llmservice`` becomes metric label ``llmservice``)."""

    LLMSERVICE = "llmservice"
    ROLE = "role"
    NAMESPACE = "namespace"


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


def probes(engine: str) -> Probes:
    try:
        return PROBES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}") from None


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
        return argv + list(w.extra_args)
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
    return argv + list(w.extra_args)


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
    return argv


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(command, args) of a container: the program and its subcommand, then the options."""
    n = len(VLLM_COMMAND) if list(argv[: len(VLLM_COMMAND)]) == list(VLLM_COMMAND) else len(BATON_COMMAND) + 1
    return list(argv[:n]), list(argv[n:])
