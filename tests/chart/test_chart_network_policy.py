"""The chart's switch for the LLMServices' NetworkPolicies: values -> the operator's flags, which the operator's
own parser and `render_network` accept."""
from __future__ import annotations

import json
import subprocess

from baton.operator import render_network

from baton.cli import build_parser

from .conftest import CHART


def operator_args(docs: list[dict]) -> list[str]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def metrics_from(args: list[str]) -> str:
    (flag,) = [a for a in args if a.startswith("--network-policy-metrics-from=")]
    return flag.split("=", 1)[1]


def test_default_is_on_with_prometheus_as_the_metrics_peer(render):
    args = operator_args(render())
    assert "--no-network-policy" not in args
    assert render_network.parse_peers(metrics_from(args)) == render_network.DEFAULT_METRICS_FROM
    parsed = build_parser().parse_args(args)  # the operator's own command line parser
    assert parsed.no_network_policy is False
    assert render_network.parse_peers(parsed.network_policy_metrics_from) == render_network.DEFAULT_METRICS_FROM


def test_switched_off_and_custom_peers(render, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"networkPolicy": {"enabled": False, "metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}]}}))
    args = operator_args(render("-f", str(values)))
    parsed = build_parser().parse_args(args)
    assert parsed.no_network_policy is True
    assert render_network.parse_peers(metrics_from(args)) == (
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},)


def test_schema_refuses_bad_peers(helm_bin):
    for bad in ("networkPolicy.enabled=maybe", "networkPolicy.metricsFrom[0].nope=1",
                "networkPolicy.metricsFrom[0].podSelector.matchLabels=x"):
        out = subprocess.run([helm_bin, "template", "x", str(CHART), "--set", bad], capture_output=True, text=True,
                             check=False)
        assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, (
            bad, out.stderr)
