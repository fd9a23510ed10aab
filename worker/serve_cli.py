"""`baton worker`: serve a model over the OpenAI API with the Baton engine, in one of the three roles.

    baton worker --role both --model ./tiny --port 8000

Hooked into `baton` by `worker/cli.py` (`add_worker_command`). Startup problems (missing model, port in use)
are one line on stderr and exit status 1; Ctrl-C stops the server, then the engine, cleanly.

SIGTERM (how Kubernetes stops a pod) drains instead (`DrainingServer`): /ready answers 503 at once so the
kubelet and the router take the worker out of rotation, requests in flight (streams included) run to the end,
new ones are still served while endpoints catch up, and the process exits 0 when nothing is in flight (after at
least server.DRAIN_ACCEPT_SECONDS) or after --drain-timeout. A second SIGTERM or Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from baton.worker.tracing import add_tracing_flag, tracer_for

from baton import launch

ROLES = ("both", "prefill", "decode")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
KV_TRANSPORTS = ("auto", "tcp", "nixl", "inprocess")
DEFAULT_KV_PORT = 14579

#: How long SIGTERM waits for requests in flight (and, on prefill, unpulled KV leases): by role, from the launch
#: contract, which also sizes the pods' terminationGracePeriodSeconds from it (launch.termination_grace_seconds),
#: so the worker exits on its own, stopping the engine cleanly, before the SIGKILL.
DEFAULT_DRAIN_TIMEOUT_SECONDS = launch.drain_timeout_seconds("decode")
#: uvicorn's graceful shutdown on Ctrl-C (SIGTERM drains instead: server.DrainingServer).
GRACEFUL_SHUTDOWN_SECONDS = 10

log = logging.getLogger("baton.worker")


def add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="serve a model over the OpenAI API (role both, prefill or decode)",
        description="Run a Baton worker: the Baton engine behind an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health, /ready, /metrics).",
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        default="both",
        help="both: a whole request here; prefill/decode: one hop of a disaggregated request",
    )
    p.add_argument(
        "--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        launch.Flag.METRICS_PORT,
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics on this port too, and nothing else there (the operator renders it: Prometheus scrapes "
        "it, so its NetworkPolicy needs no way into the worker's API; --port keeps /metrics for the router)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` clients send (default: the model directory's name)",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="most requests running in one batch")
    p.add_argument("--kv-blocks", type=int, default=None, help="number of KV-cache blocks")
    p.add_argument(
        launch.Flag.BLOCK_SIZE,
        type=int,
        default=None,
        help="tokens per KV-cache block (default 16); part of the KV-layout fingerprint, so the router hands KV "
        "only between prefill and decode workers with the same block size",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights, activations and KV cache: auto picks bfloat16 where the CPU computes it natively "
        "(AVX512-BF16 or AMX), else float32 (default auto)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per engine step: with chunked prefill the step's budget for decode rows and prompt "
        "chunks (default 512), without it the prompt tokens of one prefill step (default: a whole prompt)",
    )
    p.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mix decodes and prompt chunks in every step so a long prompt never stalls running decodes "
        "(default: on for roles both and decode, off for prefill)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before (default on)",
    )
    p.add_argument(
        "--llmservice",
        default=os.environ.get("BATON_LLMSERVICE", ""),
        help="`llmservice` metric label (default: env BATON_LLMSERVICE)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("BATON_NAMESPACE", ""),
        help="`namespace` metric label (default: env BATON_NAMESPACE)",
    )
    p.add_argument(
        "--kv-transport",
        choices=KV_TRANSPORTS,
        default=None,
        help="how prefill and decode workers move KV caches: auto (NIXL when installed and working, "
        "else TCP), tcp, nixl, inprocess (default: env BATON_KV_TRANSPORT, else auto; a `both` worker "
        "gets one only when asked)",
    )
    p.add_argument(
        "--kv-port",
        type=int,
        default=os.environ.get("BATON_KV_PORT", str(DEFAULT_KV_PORT)),
        help=f"port a prefill worker serves KV caches on; 0: any free one (default: env BATON_KV_PORT, "
        f"else {DEFAULT_KV_PORT})",
    )
    p.add_argument(
        "--kv-host",
        default=None,
        help="address of this worker that peers use for KV transfers (default: env POD_IP, else 127.0.0.1)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="devices per model replica; the Baton engine runs on one (only 1 is accepted)",
    )
    p.add_argument(
        launch.Flag.KV_LEASE_SECONDS,
        type=float,
        default=launch.KV_LEASE_SECONDS,
        help="prefill: seconds a KV cache waits for its decode worker to pull it (default "
        f"{launch.KV_LEASE_SECONDS:g})",
    )
    p.add_argument(
        launch.Flag.DRAIN_TIMEOUT,
        type=float,
        default=None,
        help="on SIGTERM, seconds to wait for requests in flight (and unpulled KV caches) before stopping "
        f"(default: prefill {launch.drain_timeout_seconds('prefill'):g}, accept window + queued prefills + one "
        f"KV lease; decode and both {DEFAULT_DRAIN_TIMEOUT_SECONDS:g}; pods get {launch.GRACE_SLACK_SECONDS:g} s "
        "more as their termination grace period)",
    )
    add_tracing_flag(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_worker)


def _listen(host: str, port: int) -> socket.socket:
    from baton.cli import CommandError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CommandError(f"cannot resolve --host {host}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _metrics_port(args: argparse.Namespace) -> int | None:
    """--metrics-port, checked: a port number of its own (not --port, not the KV port)."""
    from baton.errors import check_own_port

    port = getattr(args, "metrics_port", None)
    if port is None:
        return None
    kv = getattr(args, "kv_port", None) if args.role != "both" else None
    return check_own_port(launch.Flag.METRICS_PORT, port, {"--port": args.port, "--kv-port": kv})


def build_engine(args: argparse.Namespace):
    """The Baton engine for `args` (not started). Errors the user can fix become CommandError."""
    from baton.cli import CommandError

    model = Path(args.model)
    if not model.exists():
        raise CommandError(f"model directory {model} does not exist")
    if not model.is_dir():
        raise CommandError(f"--model {model} is not a directory")
    if not (model / "config.json").is_file():
        raise CommandError(f"{model} has no config.json (is it a Hugging Face model directory?)")
    for flag in ("max_num_seqs", "kv_blocks", "block_size", "max_model_len", "max_num_batched_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least 1")
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp != 1:
        raise CommandError(
            f"--tensor-parallel-size {tp}: the Baton engine runs on a single device; use 1, or the vLLM "
            "engine for tensor parallelism"
        )
    kv_kind = kv_transport_kind(args)
    if kv_kind is not None and kv_kind not in KV_TRANSPORTS:
        raise CommandError(
            f"BATON_KV_TRANSPORT={kv_kind!r} is not one of {', '.join(KV_TRANSPORTS)}"
        )
    if not 0 <= getattr(args, "kv_port", 0) <= 65535:
        raise CommandError("--kv-port must be in 0..65535")
    try:
        from baton.worker.engine import engine as engine_module  # noqa: F401 - torch etc. present?
    except ModuleNotFoundError as exc:
        raise CommandError(f"{exc.name} is not installed; install baton[worker]") from None
    from baton.worker.engine.types import EngineError

    try:
        return _construct_engine(args)
    except EngineError as exc:
        raise CommandError(str(exc)) from None


def _construct_engine(args: argparse.Namespace):
    from baton.worker.engine.engine import BatonEngine

    kwargs = {"role": args.role, "model_name": served_model_name(args),
              "kv_lease_seconds": getattr(args, "kv_lease_seconds", launch.KV_LEASE_SECONDS)}
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.kv_blocks is not None:
        kwargs["num_kv_blocks"] = args.kv_blocks
    if getattr(args, "block_size", None) is not None:
        kwargs["block_size"] = args.block_size
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if getattr(args, "max_num_batched_tokens", None) is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if getattr(args, "enable_chunked_prefill", None) is not None:
        kwargs["enable_chunked_prefill"] = args.enable_chunked_prefill
    kwargs["enable_prefix_caching"] = getattr(args, "enable_prefix_caching", True)
    kwargs["dtype"] = getattr(args, "dtype", "auto")
    kind = kv_transport_kind(args)
    if kind is None and args.role != "both":
        kind = "auto"
    if kind is not None:
        from baton.worker.kv.factory import make_transport

        kwargs["kv_transport"] = make_transport(
            kind, role=args.role, host=getattr(args, "kv_host", None), port=getattr(args, "kv_port", 0)
        )
    return BatonEngine.from_pretrained(args.model, **kwargs)


def kv_transport_kind(args: argparse.Namespace) -> str | None:
    """--kv-transport, else env BATON_KV_TRANSPORT, else None (the role's default)."""
    return getattr(args, "kv_transport", None) or os.environ.get("BATON_KV_TRANSPORT") or None


def served_model_name(args: argparse.Namespace) -> str:
    return args.served_model_name or Path(args.model).resolve().name


def run_worker(args: argparse.Namespace) -> int:
    import uvicorn
    from baton.worker.server import DrainingServer, create_app

    from baton.cli import CommandError

    if args.kv_lease_seconds <= 0:
        raise CommandError(f"{launch.Flag.KV_LEASE_SECONDS} must be more than 0")
    if args.drain_timeout is None:
        args.drain_timeout = launch.drain_timeout_seconds(args.role, args.kv_lease_seconds)
    if args.drain_timeout < 0:
        raise CommandError("--drain-timeout must be at least 0")
    least = launch.DRAIN_ACCEPT_SECONDS + args.kv_lease_seconds
    if args.role == "prefill" and args.drain_timeout < least:
        log.warning("--drain-timeout %g is shorter than the accept window plus one KV lease (%g s): a drain may "
                    "cut KV caches their decode workers have not pulled yet", args.drain_timeout, least)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tracer = tracer_for(args.otlp_traces_endpoint, args.role, args.llmservice, args.namespace)
    except (ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    metrics_port = _metrics_port(args)
    sock = _listen(args.host, args.port)  # first, so a busy port fails before the model loads
    sockets = [sock]
    try:
        if metrics_port is not None:
            sockets.append(_listen(args.host, metrics_port))
        engine = build_engine(args)
        served = served_model_name(args)
        app = create_app(
            engine,
            served_model_name=served,
            labels={"llmservice": args.llmservice, "namespace": args.namespace, "role": args.role},
            tracer=tracer,
            metrics_port=metrics_port,
        )
        config = uvicorn.Config(
            app, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, access_log=False
        )
        server = DrainingServer(config, app.state.baton, args.drain_timeout)
        log.info("serving %s as %r (role %s) on http://%s:%d%s", args.model, served, args.role, args.host, args.port,
                 "" if metrics_port is None else f"; /metrics on port {metrics_port} too")
        server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()
    if server.forced:
        log.warning("stopped at once by a second signal; %d requests in flight were cut", server.cut_requests)
        return 1
    if server.drain_started is not None:
        log.info("drain finished; worker stopped")
    return 0 if server.started else 1
