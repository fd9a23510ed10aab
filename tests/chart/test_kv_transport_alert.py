"""BatonKVTransportDegraded fires from the series a real Baton worker exports: the input series of this promtool
test are taken from the worker's own /metrics text (worker/metrics.py), not written by hand, so an alert that
queries a label no exporter produces (it once asked for `requested`) cannot pass."""
from __future__ import annotations

import subprocess

import yaml
from baton.worker.engine.types import EngineStats
from baton.worker.metrics import WorkerMetrics

from baton.launch import KV_TRANSPORT_RDMA, KV_TRANSPORT_TCP, KV_TRANSPORT_UCX_TCP, Metric

from .conftest import CHART
from .test_observability import _promtool

RULES = CHART / "files" / "prometheus-rules.yaml"


def exported_series(llmservice: str, transport: str) -> list[str]:
    """The `baton_kv_transport_info` lines of a decode worker's /metrics moving KV over `transport`."""
    metrics = WorkerMetrics(model_name="m", role="decode", stats=lambda: EngineStats(kv_transport=transport),
                            labels={"llmservice": llmservice, "namespace": "ns"})
    text = metrics.render().decode()
    lines = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith(Metric.KV_TRANSPORT_INFO + "{")]
    assert lines, text
    return lines


def annotations(labels: dict[str, str]) -> dict[str, str]:
    """The alert's annotations as Prometheus fills them in for `labels`."""
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "BatonKVTransportDegraded")
    out = {}
    for key, text in rule["annotations"].items():
        for name, value in labels.items():
            text = text.replace("{{ $labels." + name + " }}", value)
        out[key] = text
    return out


def test_alert_fires_from_the_workers_own_series(tmp_path):
    series = {svc: exported_series(svc, transport) for svc, transport in
              (("nixl-no-rdma", KV_TRANSPORT_UCX_TCP), ("rdma", KV_TRANSPORT_RDMA), ("plain", KV_TRANSPORT_TCP))}
    assert f'transport="{KV_TRANSPORT_UCX_TCP}"' in series["nixl-no-rdma"][0]
    labels = {"severity": "warning", "namespace": "ns", "llmservice": "nixl-no-rdma", "transport": KV_TRANSPORT_UCX_TCP}
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": "1x20"} for lines in series.values() for s in lines],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "BatonKVTransportDegraded", "exp_alerts": []},  # `for: 5m`
                {"eval_time": "10m", "alertname": "BatonKVTransportDegraded", "exp_alerts": [{
                    "exp_labels": labels, "exp_annotations": annotations(labels)}]},
            ],
        }],
    }
    path = tmp_path / "kv_transport_test.yaml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
