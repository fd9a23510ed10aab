"""Traces from the chart: `tracing.otlpEndpoint` becomes the operator's --otlp-traces-endpoint, and the operator
renders it onto every pod of an LLMService that names no endpoint of its own (spec.observability.otlpEndpoint
wins); unset, nothing is traced. The operator's args are read with the real `baton operator run` parser."""
from __future__ import annotations

import argparse
import copy
import subprocess

import pytest
import yaml
from baton.operator import tracing
from baton.operator.render import render as render_service
from baton.operator.run_cli import add_operator_command

from baton import launch

from .conftest import CHART, REPO

EXAMPLE = REPO / "examples" / "llama-disagg.yaml"  # vLLM workers + the router


def _operator_endpoint(docs: list[dict]) -> str | None:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    parser = argparse.ArgumentParser()
    add_operator_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"]).otlp_traces_endpoint


def _endpoints(svc: dict, default: str | None) -> dict[str, tuple[str | None, str | None]]:
    """{container: (its --otlp-traces-endpoint, its OTLP protocol env)} of the service's pods, rendered by an
    operator started with `default`."""
    saved = tracing.OPTIONS
    try:
        tracing.configure(default)
        out = {}
        for m in render_service(svc):
            if m["kind"] != "Deployment":
                continue
            c = m["spec"]["template"]["spec"]["containers"][0]
            argv = c["args"]
            flag = launch.Flag.OTLP_TRACES_ENDPOINT
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            out[m["metadata"]["name"]] = (argv[argv.index(flag) + 1] if flag in argv else None,
                                          env.get(launch.Env.OTEL_TRACES_PROTOCOL))
        return out
    finally:
        tracing.OPTIONS = saved


def _service() -> dict:
    svc = next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if isinstance(d, dict) and d.get("kind") == "LLMService")
    svc.setdefault("metadata", {}).setdefault("namespace", "ns")
    return svc


def test_the_chart_value_is_every_pods_traces_endpoint(render):
    default = _operator_endpoint(render("--set", "tracing.otlpEndpoint=http://otel.observability:4318"))
    assert default == "http://otel.observability:4318"
    svc = _service()
    got = _endpoints(svc, default)
    assert set(got) == {"llama-8b-prefill", "llama-8b-decode", "llama-8b-router"}, got
    assert got["llama-8b-router"] == ("http://otel.observability:4318/v1/traces", None)
    for role in ("prefill", "decode"):  # vLLM workers: its exporter told to speak OTLP/HTTP
        assert got[f"llama-8b-{role}"] == ("http://otel.observability:4318/v1/traces", launch.OTLP_HTTP_PROTOCOL)
    own = copy.deepcopy(svc)
    own["spec"]["observability"] = {"otlpEndpoint": "https://tempo.team-a:4318/v1/traces"}
    assert {e for e, _ in _endpoints(own, default).values()} == {"https://tempo.team-a:4318/v1/traces"}


def test_default_values_trace_nothing(render):
    assert _operator_endpoint(render()) is None
    assert set(_endpoints(_service(), None).values()) == {(None, None)}


def test_the_schema_refuses_an_endpoint_that_is_no_url(helm_bin):
    out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", "tracing.otlpEndpoint=otel:4318"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "tracing.otlpEndpoint" in out.stderr, out.stderr


@pytest.mark.parametrize("bad", ["otel:4318", "grpc://otel:4317"])
def test_the_operator_refuses_an_endpoint_that_is_no_url(bad):
    with pytest.raises(ValueError, match="http:// or https://"):
        tracing.configure(bad)
    assert tracing.OPTIONS.otlp_endpoint is None
