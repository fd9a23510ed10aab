"""The launch contract, checked by the parsers that consume it.

Every command line that `render` (Kubernetes pods) and `baton up` (local processes) produce is parsed by the
real CLI parser it targets -- `baton worker` / `baton router` from `baton.cli`, and vLLM's own parser where
vLLM is installed -- instead of being compared as strings. The values the parsers see must be the ones the
LLMService asked for.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from baton.operator.render import render
from baton.operator.units import Duration
from baton.worker.router.cli import build_config

from baton import launch
from baton.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
INPUTS = sorted((ROOT / "tests" / "operator" / "golden" / "inputs").glob("*.yaml")) + sorted(
    (ROOT / "examples").glob("*.yaml")
)


def _llmservices() -> list[tuple[str, dict]]:
    out = []
    for path in INPUTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "LLMService":
                doc = copy.deepcopy(doc)
                doc.setdefault("metadata", {}).setdefault("namespace", "ns")
                out.append((f"{path.parent.name}/{path.name}", doc))
    return out


def _containers(manifests: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for m in manifests:
        if m["kind"] != "Deployment":
            continue
        for c in m["spec"]["template"]["spec"]["containers"]:
            found.append((m["metadata"]["name"], c))
    return found


def _vllm_parser():
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vLLM 0.32
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except Exception:  # noqa: BLE001 - not installed (it lives in its own virtualenv)
        return None
    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize(("name", "svc"), _llmservices(), ids=[n for n, _ in _llmservices()])
def test_rendered_command_lines_parse_with_their_real_parsers(name: str, svc: dict) -> None:
    spec = svc["spec"]
    engine = spec.get("engine", {}).get("kind", "vllm")
    containers = _containers(render(svc))
    assert containers, name
    for deployment, c in containers:
        argv = [*c["command"], *c["args"]]
        if c["name"] == "router":
            args = build_parser().parse_args(argv[1:])
            assert args.host == launch.POD_LISTEN_HOST
            assert args.health_path == launch.probes(engine).readiness, deployment
            assert args.prefill_service and args.decode_service and args.namespace == svc["metadata"]["namespace"]
            assert c["readinessProbe"]["httpGet"]["path"] == launch.ROUTER_PROBES.readiness
            failure = spec.get("router", {}).get("prefillFailure", {})
            assert args.prefill_recompute == failure.get("recompute", launch.RECOMPUTE_WHEN_HEADROOM)
            assert args.prefill_retries == failure.get("retries", 1) and args.prefill_retry_after >= 1
            assert args.tpot_slo == pytest.approx(Duration(spec.get("slo", {}).get("tpot", "50ms")).seconds)
            assert build_config(args).prefill_failure.tpot_slo == args.tpot_slo  # the router accepts them
            continue
        probes = launch.probes(engine)
        assert c["readinessProbe"]["httpGet"]["path"] == probes.readiness
        assert c["livenessProbe"]["httpGet"]["path"] == probes.liveness
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        if engine == launch.ENGINE_BATON:
            args = build_parser().parse_args(argv[1:])
            assert args.host == launch.POD_LISTEN_HOST, f"{deployment} would listen on {args.host}"
            assert args.served_model_name == spec["model"]["name"]
            assert args.port == port
            assert args.role in ("prefill", "decode")
            env = {e["name"] for e in c["env"]}
            assert {launch.Env.LLMSERVICE, launch.Env.NAMESPACE, launch.Env.POD_IP} <= env
        else:
            assert argv[:2] == list(launch.VLLM_COMMAND)
            assert argv[argv.index(launch.Flag.HOST) + 1] == launch.POD_LISTEN_HOST
            assert argv[argv.index(launch.Flag.SERVED_MODEL_NAME) + 1] == spec["model"]["name"]
            parser = _vllm_parser()
            if parser is not None:  # vLLM's own parser, where vLLM is installed
                args = parser.parse_args(argv[2:])
                assert args.host == launch.POD_LISTEN_HOST and args.port == port


def test_baton_up_command_lines_parse_with_the_real_parsers(tmp_path) -> None:
    from baton.worker.local_fleet import Capabilities, load_spec, plan_fleet

    svc = load_spec(ROOT / "examples" / "tiny-local.yaml")
    caps = Capabilities(router=True, kv_transport_flag=True)
    plan = plan_fleet(svc, model_path=str(tmp_path), caps=caps)
    seen = set()
    for proc in plan.procs:
        sub = proc.argv.index("worker") if "worker" in proc.argv else proc.argv.index("router")
        args = build_parser().parse_args(proc.argv[sub:])
        seen.add(args.command)
        assert args.host == launch.LOCAL_LISTEN_HOST and args.port == proc.port
        if args.command == "worker":
            assert args.served_model_name == svc.spec.model.name and args.role == proc.role
            assert args.kv_transport == "tcp" and args.kv_port == proc.kv_port
        else:
            assert args.health_path == launch.probes(launch.ENGINE_BATON).readiness
            assert args.prefill and args.decode
    assert seen == {"worker", "router"}


def test_flags_used_by_the_contract_exist_in_the_parsers() -> None:
    """A renamed option in `baton worker`/`baton router` must break here, not in a crash-looping pod."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    worker_opts = set(sub.choices["worker"]._option_string_actions)
    router_opts = set(sub.choices["router"]._option_string_actions)
    for flag in (launch.Flag.ROLE, launch.Flag.MODEL, launch.Flag.HOST, launch.Flag.PORT,
                 launch.Flag.SERVED_MODEL_NAME, launch.Flag.MAX_MODEL_LEN, launch.Flag.TENSOR_PARALLEL_SIZE,
                 launch.Flag.KV_TRANSPORT, launch.Flag.KV_PORT, launch.Flag.LLMSERVICE, launch.Flag.NAMESPACE,
                 launch.Flag.LOG_LEVEL):
        assert flag in worker_opts, flag
    for flag in (launch.Flag.HOST, launch.Flag.PORT, launch.Flag.POLICY, launch.Flag.HEALTH_PATH,
                 launch.Flag.PREFILL, launch.Flag.DECODE, launch.Flag.BOTH, launch.Flag.PREFILL_SERVICE,
                 launch.Flag.DECODE_SERVICE, launch.Flag.BOTH_SERVICE, launch.Flag.NAMESPACE,
                 launch.Flag.LLMSERVICE, launch.Flag.LOG_LEVEL):
        assert flag in router_opts, flag


def test_the_traces_endpoint_reaches_every_pod_through_the_parsers() -> None:
    """spec.observability.otlpEndpoint (a collector's base URL) -> `--otlp-traces-endpoint URL/v1/traces` on the
    router and every worker, read back by the real parsers; vLLM workers also get the OTLP/HTTP protocol variable
    (vLLM's exporter speaks gRPC otherwise). vLLM's own parser reads it in tests/worker/test_vllm.py."""
    url = "http://otel.observability:4318" + launch.OTLP_TRACES_PATH
    for name, svc in _llmservices():
        svc["spec"]["observability"] = {"otlpEndpoint": "http://otel.observability:4318"}
        engine = svc["spec"].get("engine", {}).get("kind", "vllm")
        for deployment, c in _containers(render(svc)):
            argv = [*c["command"], *c["args"]]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if c["name"] == "router" or engine == launch.ENGINE_BATON:
                assert build_parser().parse_args(argv[1:]).otlp_traces_endpoint == url, (name, deployment)
                assert launch.Env.OTEL_TRACES_PROTOCOL not in env
            else:
                assert argv[argv.index(launch.Flag.OTLP_TRACES_ENDPOINT) + 1] == url, (name, deployment)
                assert env[launch.Env.OTEL_TRACES_PROTOCOL] == launch.OTLP_HTTP_PROTOCOL
        svc["spec"]["observability"] = {}
        for deployment, c in _containers(render(svc)):  # unset: nothing traced, nothing rendered
            assert not any(a.startswith(launch.Flag.OTLP_TRACES_ENDPOINT) for a in c["args"]), (name, deployment)


def test_otlp_traces_url() -> None:
    assert launch.otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert launch.otlp_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert launch.otlp_traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"
    for bad in ("c:4318", "grpc://c:4317", "http://"):
        with pytest.raises(ValueError, match="http:// or https:// URL with a host"):
            launch.otlp_traces_url(bad)


def test_baton_up_traces_where_the_llmservice_says(tmp_path) -> None:
    """`baton up` reads spec.observability.otlpEndpoint as the operator does: every process gets the flag."""
    from baton.worker.local_fleet import Capabilities, load_spec, plan_fleet

    body = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    body["spec"]["observability"] = {"otlpEndpoint": "http://127.0.0.1:4318"}
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(body))
    plan = plan_fleet(load_spec(path), model_path=str(tmp_path), caps=Capabilities(router=True, kv_transport_flag=True))
    for proc in plan.procs:
        sub = proc.argv.index("worker") if "worker" in proc.argv else proc.argv.index("router")
        assert build_parser().parse_args(proc.argv[sub:]).otlp_traces_endpoint == "http://127.0.0.1:4318/v1/traces"
