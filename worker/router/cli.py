"""`baton router`: the OpenAI-compatible front of a disaggregated (or colocated) worker fleet.

    baton router --policy least-loaded --port 8080 --prefill http://p0:8000 --decode http://d0:8000
    baton router --policy round-robin --port 8080 --both http://w0:8000,http://w1:8000
    baton router --policy prefix-aware --port 8080 --prefill-service chat-prefill \\
        --decode-service chat-decode --namespace ml          # (what the operator renders)

Hooked into `baton` by `worker/cli.py`. Problems the user can fix (no workers given, a bad URL, a busy port,
no Kubernetes configuration) are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from baton.worker.router.config import DEFAULT_WORKER_WAIT
from baton.worker.router.policy import DEFAULT_PREFIX_CHARS, POLICIES
from baton.worker.router.pool import DEFAULT_HEALTH_PATH, validate_health_path
from baton.worker.router.prefill_failure import (
    DEFAULT_RECOMPUTE,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_AFTER,
    HEADROOM_FRACTION,
    HEADROOM_WINDOW,
    REOPEN_FRACTION,
)
from baton.worker.tracing import add_tracing_flag

from baton import launch
from baton.errors import check_own_port
from baton.launch import RECOMPUTE_MODES, Flag

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_router_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "router",
        help="route OpenAI requests through prefill and decode workers (or to colocated workers)",
        description="Run the Baton router: an OpenAI-compatible front (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /ready, /metrics) that sends each request's prefill to "
        "a prefill worker and its decode to a decode worker, chaining them with kv_transfer_params.",
    )
    p.add_argument("--policy", choices=POLICIES, default="least-loaded",
                   help="how to pick a worker (default least-loaded)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(Flag.DRAIN_TIMEOUT, type=float, default=0.0, metavar="SECONDS",
                   help="on SIGTERM, keep serving for a few seconds (/ready 503) while the endpoint removal spreads, "
                   "then let the requests in flight finish for up to this long (default 0: stop at once; the "
                   f"operator renders {launch.STREAM_DRAIN_SECONDS:g})")
    p.add_argument(Flag.METRICS_PORT, type=int, default=None, metavar="PORT",
                   help="serve /metrics on this port instead of --port (the operator renders it: the client-facing "
                   "Service then hands out no metrics, which name the workers' addresses)")
    g = p.add_argument_group("static workers (comma-separated URLs; the flag may repeat)")
    g.add_argument("--prefill", action="append", default=[], metavar="URL,...", help="prefill workers")
    g.add_argument("--decode", action="append", default=[], metavar="URL,...", help="decode workers")
    g.add_argument("--both", action="append", default=[], metavar="URL,...",
                   help="colocated workers (role both: no prefill/decode split)")
    k = p.add_argument_group("Kubernetes discovery (Endpoints of headless Services, port named http)")
    k.add_argument("--prefill-service", help="Service of the prefill workers")
    k.add_argument("--decode-service", help="Service of the decode workers")
    k.add_argument("--both-service", help="Service of colocated workers")
    k.add_argument("--namespace", default=None,
                   help="namespace of the Services (default: the pod's namespace, else 'default')")
    k.add_argument("--discovery-interval", type=float, default=2.0,
                   help="seconds between Endpoints reads (default 2)")
    p.add_argument("--health-interval", type=float, default=launch.ROUTER_HEALTH_INTERVAL_SECONDS,
                   help="seconds between health checks of each worker (default %(default)g); each check waits "
                   f"{launch.WORKER_READINESS.timeout_seconds} s, and {launch.WORKER_READINESS.failure_threshold} "
                   "checks in a row without an answer take a worker out (a 503 or a refused connection at once)")
    p.add_argument("--health-path", default=DEFAULT_HEALTH_PATH, metavar="PATH",
                   help="path the health checks GET on each worker; 200 means healthy (default "
                   f"{DEFAULT_HEALTH_PATH}, Baton's workers; use /health for vLLM workers, which serve no "
                   f"{DEFAULT_HEALTH_PATH})")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to connect to a worker (default 5)")
    p.add_argument("--hop-timeout", type=float, default=60.0,
                   help="seconds a worker may take to answer a hop with its response headers (time to first "
                   "byte) before the hop counts as failed and is retried elsewhere; 0: no limit (default 60)")
    p.add_argument("--stream-idle-timeout", type=float, default=60.0,
                   help="seconds a worker's response may go without a byte (between SSE events, or within a "
                   "JSON body) before the hop counts as failed; 0: no limit (default 60)")
    p.add_argument("--worker-wait", type=float, default=DEFAULT_WORKER_WAIT,
                   help="seconds a request waits for a decode (or both) worker to become healthy when there is "
                   "none (a sole worker being replaced, a fleet starting) before it gets 503 + Retry-After; 0: "
                   f"fail at once (default {DEFAULT_WORKER_WAIT:g})")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="attempts at the decode hop before any byte reached the client (default 3)")
    f = p.add_argument_group("prefill failures (a failed prefill hop: connection error, 5xx, timeout, no "
                             "kv_transfer_params; or no healthy prefill worker)")
    f.add_argument(Flag.PREFILL_RETRIES, type=int, default=DEFAULT_RETRIES, metavar="N",
                   help=f"other prefill workers to try, each once, before recompute or 503 (default {DEFAULT_RETRIES})")
    f.add_argument(Flag.PREFILL_RECOMPUTE, choices=RECOMPUTE_MODES, default=DEFAULT_RECOMPUTE,
                   help="then recompute the prompt on the decode worker: whenHeadroom (while the router's TPOT p90 "
                   f"over the last {HEADROOM_WINDOW:g}s is within {HEADROOM_FRACTION * 100:g}%% of --tpot-slo; once "
                   f"over, until it is back under {REOPEN_FRACTION * 100:g}%%), always, "
                   f"or never; otherwise 503 + Retry-After (default {DEFAULT_RECOMPUTE})")
    f.add_argument(Flag.PREFILL_RETRY_AFTER, type=int, default=DEFAULT_RETRY_AFTER, metavar="SECONDS",
                   help=f"Retry-After of that 503, whole seconds (default {DEFAULT_RETRY_AFTER})")
    f.add_argument(Flag.TPOT_SLO, type=float, default=None, metavar="SECONDS",
                   help="the TPOT SLO (p90) whenHeadroom protects, e.g. 0.05 (default: none, so whenHeadroom "
                   "always recomputes)")
    p.add_argument(Flag.KV_ANNOUNCE, action="store_true",
                   help="layer-wise KV hand-off (Baton prefill workers only): stream the prefill hop and start the "
                   "decode hop as soon as the prefill worker announces its KV, before its forward ends; the decode "
                   "worker pulls the layers as they are written and computes the first token itself")
    p.add_argument("--prefix-chars", type=int, default=DEFAULT_PREFIX_CHARS,
                   help=f"prompt characters hashed by prefix-aware (default {DEFAULT_PREFIX_CHARS})")
    p.add_argument("--llmservice", default=os.environ.get("BATON_LLMSERVICE", ""),
                   help="`llmservice` metric label (default: env BATON_LLMSERVICE)")
    add_tracing_flag(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_router)


def _urls(values: list[str], flag: str) -> list[str]:
    from baton.worker.router.pool import normalize_url

    from baton.cli import CommandError

    out = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            try:
                out.append(normalize_url(item))
            except ValueError as exc:
                raise CommandError(f"{flag}: {exc}") from None
    return out


def build_config(args: argparse.Namespace):
    """The RouterConfig for `args`; CommandError for what the user can fix."""
    from baton.worker.router.config import RouterConfig

    from baton.cli import CommandError

    prefill, decode, both = _urls(args.prefill, "--prefill"), _urls(args.decode, "--decode"), \
        _urls(args.both, "--both")
    services = [args.prefill_service, args.decode_service, args.both_service]
    if not (prefill or decode or both or any(services)):
        raise CommandError("no workers: give --prefill and --decode URLs, --both URLs, or "
                           "--prefill-service and --decode-service (Kubernetes)")
    if bool(prefill) != bool(decode) and not both:
        raise CommandError("--prefill and --decode go together (or add --both workers)")
    if args.prefill_service and not (args.decode_service or args.both_service):
        raise CommandError("--prefill-service needs --decode-service (--decode-service alone: a decode-only "
                           "fleet, whose decode workers compute the prompts)")
    if args.port < 0 or args.port > 65535:
        raise CommandError(f"--port {args.port} is not a port number")
    if args.metrics_port is not None:
        check_own_port(Flag.METRICS_PORT, args.metrics_port, {"--port": args.port})
    if args.drain_timeout < 0:
        raise CommandError(f"{Flag.DRAIN_TIMEOUT} must be at least 0")
    for flag in ("discovery_interval", "health_interval", "connect_timeout"):
        if getattr(args, flag) <= 0:
            raise CommandError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("hop_timeout", "stream_idle_timeout", "worker_wait"):
        if getattr(args, flag) < 0:
            raise CommandError(f"--{flag.replace('_', '-')} must be 0 (no limit) or positive")
    try:
        health_path = validate_health_path(args.health_path)
    except ValueError as exc:
        raise CommandError(f"--health-path {exc}") from None
    if args.max_attempts < 1:
        raise CommandError("--max-attempts must be at least 1")
    if args.prefix_chars < 1:
        raise CommandError("--prefix-chars must be at least 1")
    from baton.worker.router.prefill_failure import PrefillFailurePolicy

    if args.prefill_retries < 0:
        raise CommandError(f"{Flag.PREFILL_RETRIES} must be 0 or more")
    if args.prefill_retry_after < 1:
        raise CommandError(f"{Flag.PREFILL_RETRY_AFTER} must be at least 1 (seconds)")
    if args.tpot_slo is not None and not args.tpot_slo > 0:
        raise CommandError(f"{Flag.TPOT_SLO} must be positive (seconds)")
    prefill_failure = PrefillFailurePolicy(retries=args.prefill_retries, recompute=args.prefill_recompute,
                                           retry_after=args.prefill_retry_after, tpot_slo=args.tpot_slo)
    if args.otlp_traces_endpoint:
        try:
            launch.otlp_traces_url(args.otlp_traces_endpoint)
        except ValueError as exc:
            raise CommandError(f"{Flag.OTLP_TRACES_ENDPOINT}: {exc}") from None
    namespace = args.namespace
    if namespace is None:
        namespace = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.is_file() else "default"
    return RouterConfig(
        policy=args.policy, prefill=prefill, decode=decode, both=both, namespace=namespace,
        prefill_service=args.prefill_service, decode_service=args.decode_service,
        both_service=args.both_service, discovery_interval=args.discovery_interval,
        health_interval=args.health_interval, health_path=health_path, connect_timeout=args.connect_timeout,
        hop_timeout=args.hop_timeout, stream_idle_timeout=args.stream_idle_timeout, worker_wait=args.worker_wait,
        max_attempts=args.max_attempts, prefix_chars=args.prefix_chars, llmservice=args.llmservice,
        metrics_namespace=os.environ.get("BATON_NAMESPACE") or (namespace if any(services) else ""),
        prefill_failure=prefill_failure, kv_announce=args.kv_announce,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
    )


def run_router(args: argparse.Namespace) -> int:
    from baton.worker.serve_cli import _listen

    from baton.cli import CommandError

    config = build_config(args)
    if config.services():
        from baton.worker.router.discovery import load_kube_api

        try:
            config.kube_api = load_kube_api()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _listen(args.host, args.port)
    try:
        metrics_sock = _listen(args.host, args.metrics_port) if args.metrics_port is not None else None
    except CommandError:
        sock.close()
        raise
    try:
        asyncio.run(_main(config, sock, args, metrics_sock))
    finally:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
    return 0


async def _main(config, sock, args, metrics_sock=None) -> None:
    from baton.worker.router.app import serve

    stop, drain_on = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # SIGTERM drains (drain.py); a second one stops at once
    loop.add_signal_handler(signal.SIGTERM, lambda: (stop if drain_on.is_set() else drain_on).set())
    where = ", ".join(
        f"{role} {','.join(getattr(config, role))}" for role in ("prefill", "decode", "both")
        if getattr(config, role)
    ) or f"Services {config.services()} in namespace {config.namespace}"
    logging.getLogger("baton.router").info(
        "routing (%s) on http://%s:%d to %s; /metrics on port %d", config.policy, args.host, args.port, where,
        args.port if metrics_sock is None else args.metrics_port,
    )
    await serve(config, [sock], stop, metrics_sockets=[metrics_sock] if metrics_sock is not None else [],
                drain_on=drain_on, drain_timeout=args.drain_timeout)
