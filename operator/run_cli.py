"""`baton operator run`: start the kopf operator (reconcilers, autoscaler timers, admission webhook)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from baton.cli import CommandError
from baton.launch import Flag


def add_operator_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("operator", help="the Kubernetes operator")
    actions = parser.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run the operator against the current kubeconfig / in-cluster config")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)")
    run.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    run.add_argument("--no-webhook", action="store_true", help="do not serve the validating admission webhook")
    run.add_argument("--webhook-port", type=int, default=9443)
    run.add_argument("--webhook-listen", default="0.0.0.0", help="address the webhook server binds")
    run.add_argument("--webhook-host", default="127.0.0.1",
                     help="host name/IP the apiserver uses to reach the webhook (a Service DNS name in a cluster)")
    run.add_argument("--webhook-cert", default=None, help="TLS certificate (default: a generated self-signed one)")
    run.add_argument("--webhook-key", default=None)
    run.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL ('' to disable)")
    run.add_argument("--metrics-port", type=int, default=8080,
                     help="serve the operator's Prometheus metrics (autoscaler decisions) on this port; 0 disables")
    run.add_argument("--metrics-listen", default="0.0.0.0", help="address the metrics server binds")
    run.add_argument("--autoscaler-window", default=None, metavar="DURATION",
                     help="rate() window of the autoscaler's Prometheus queries, e.g. 1m "
                          "(default: 4x each LLMService's autoscaling.interval, at least 1m)")
    run.add_argument("--worker-image", default=None, metavar="IMAGE",
                     help="image of the routers, model-fetch init containers and Baton-engine workers of LLMServices "
                          "that name none (default: $BATON_WORKER_IMAGE, else baton/worker:<version>)")
    run.add_argument("--image-pull-secret", action="append", default=[], metavar="SECRET",
                     help="imagePullSecret for every pod the operator renders, by name in the LLMService's namespace "
                          "(repeatable; default: $BATON_IMAGE_PULL_SECRETS, comma-separated)")
    run.add_argument("--model-cache-path", default=None, metavar="DIR",
                     help="node folder (hostPath) of the model cache of `uri` model sources, shared by the pods "
                          "on a node (default: $BATON_MODEL_CACHE_PATH, else /var/lib/baton/model-cache)")
    run.add_argument("--no-network-policy", action="store_true",
                     help="render no NetworkPolicies for LLMServices that do not ask for them "
                          "(spec.networkPolicy.enabled; default: one per role, see operator/render_network.py)")
    run.add_argument("--network-policy-metrics-from", default=None, metavar="JSON",
                     help="who may scrape the pods' metrics port: a JSON list of NetworkPolicy peers "
                          "({namespaceSelector, podSelector}); default: pods labelled "
                          "app.kubernetes.io/name=prometheus in any namespace")
    run.add_argument(Flag.OTLP_TRACES_ENDPOINT, default=None, metavar="URL",
                     help="OTLP/HTTP endpoint the pods of LLMServices that name none (spec.observability.otlpEndpoint) "
                          "send OpenTelemetry traces to (default: no tracing)")
    run.add_argument("--verbose", "-v", action="store_true")
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Before importing kopf or the kubernetes client: the client fixes its default kubeconfig path at import.
    if args.kubeconfig:
        if not os.path.exists(args.kubeconfig):
            raise CommandError(f"kubeconfig {args.kubeconfig} does not exist")
        os.environ["KUBECONFIG"] = args.kubeconfig

    import kopf
    from baton.operator import autoscaler, images, model_cache, render_network, tracing, webhook
    from baton.operator.units import parse_duration
    images.configure(args.worker_image, args.image_pull_secret)
    try:
        render_network.configure(not args.no_network_policy, args.network_policy_metrics_from)
    except ValueError as exc:
        raise CommandError(f"--network-policy-metrics-from: {exc}") from None
    try:
        tracing.configure(args.otlp_traces_endpoint)
    except ValueError as exc:
        raise CommandError(f"{Flag.OTLP_TRACES_ENDPOINT}: {exc}") from None
    try:
        model_cache.configure(args.model_cache_path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    webhook.OPTIONS.enabled = not args.no_webhook
    webhook.OPTIONS.listen, webhook.OPTIONS.port, webhook.OPTIONS.host = (args.webhook_listen, args.webhook_port,
                                                                            args.webhook_host)
    webhook.OPTIONS.certfile, webhook.OPTIONS.keyfile = args.webhook_cert, args.webhook_key
    if not 0 <= args.metrics_port <= 65535:
        raise CommandError(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    autoscaler.OPTIONS.metrics_port, autoscaler.OPTIONS.metrics_listen = args.metrics_port, args.metrics_listen
    if args.autoscaler_window:
        try:
            autoscaler.OPTIONS.window_s = parse_duration(args.autoscaler_window)
        except ValueError as exc:
            raise CommandError(f"--autoscaler-window: {exc}") from None
        if autoscaler.OPTIONS.window_s <= 0:
            raise CommandError("--autoscaler-window must be greater than zero")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one line per Prometheus query (the autoscaler's) is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    import baton.operator.handlers  # noqa: F401  (registers the handlers)

    try:
        asyncio.run(kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        ))
    except KeyboardInterrupt:
        pass
    return 0
