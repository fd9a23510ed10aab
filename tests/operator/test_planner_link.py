"""The KV hand-off time uses the link bandwidth the fleet measured (`baton_kv_transfer_*`) when there is one, for
the link its hand-offs crossed, and the plan says which it used. Pure logic: no Prometheus."""
from __future__ import annotations

import asyncio

import pytest
from baton.operator.planner import SLO, Cluster, plan
from baton.operator.planner.basis import WorkloadBasis, moved
from baton.operator.planner.link import MIN_TRANSFERS, LinkMeasurement, choose_link
from baton.operator.planner.report import format_plan, to_status
from baton.operator.prometheus import PrometheusSource

from baton.profile import ModelProfiles
from baton.workload import LengthDist, Workload
from tests.operator.test_planner import _Kube, _Source, _State, flat, svc_dict

GB = 1e9


def measured(gb_s: float, transfers: float = 100, window_s: float = 60.0) -> LinkMeasurement:
    # 2 transfer-seconds per second, as a busy fleet's decode workers would sum them
    return LinkMeasurement(gb_s * GB * 2.0, 2.0, transfers / window_s, window_s)


def test_the_measured_bandwidth_is_bytes_over_transfer_seconds():
    m = measured(3.2, transfers=120, window_s=300)
    assert m.gb_s == pytest.approx(3.2) and m.transfers == pytest.approx(120)
    assert LinkMeasurement(None, None, None, 60).gb_s is None
    assert LinkMeasurement(1e9, 0.0, 1.0, 60).gb_s is None  # NaN-free: no seconds, no bandwidth


def test_the_measurement_replaces_the_link_the_hand_offs_crossed():
    two = Cluster(gpus_per_node=4, nodes=2, intra_node_gb_s=300, inter_node_gb_s=12.5)
    across = choose_link(two, measured(2.0), "any")
    assert across.source == "measured" and across.link == "cross-node"
    assert (across.cluster.intra_node_gb_s, across.cluster.inter_node_gb_s) == (300, pytest.approx(2.0))
    assert "measured: 2 GB/s across nodes over 100 KV hand-offs" in across.why
    assert "instead of the configured 12.5 GB/s" in across.why
    # hand-offs kept in a node (locality node), or a one-node cluster: the measurement is the in-node link
    inside = choose_link(two, measured(40.0), "node")
    assert inside.link == "node" and inside.cluster.intra_node_gb_s == pytest.approx(40.0)
    assert inside.cluster.inter_node_gb_s == 12.5
    assert choose_link(Cluster(4), measured(40.0), "any").link == "node"


def test_no_or_too_little_measurement_keeps_the_configured_constant_and_says_so():
    c = Cluster(gpus_per_node=4, nodes=2)
    none = choose_link(c, None, "any")
    assert none.source == "configured" and none.cluster == c and "no KV hand-off measured" in none.why
    empty = choose_link(c, LinkMeasurement(None, None, None, 60), "any")
    assert empty.source == "configured"
    few = choose_link(c, measured(2.0, transfers=MIN_TRANSFERS - 1), "any")
    assert few.source == "configured" and few.cluster == c and f"fewer than {MIN_TRANSFERS}" in few.why


def test_a_slow_measured_link_lengthens_the_hand_off_and_pins_locality():
    # 100-token prompts of 1 MB per token: 100 MB a hand-off; 12.5 GB/s -> 8 ms (any), 1 GB/s -> 100 ms (node)
    prof = ModelProfiles("m", {1: flat(prefill_ms=20, kv=50_000, limit=4096)}, kv_bytes_per_token=1_000_000)
    w = Workload(0.0, LengthDist.fixed(100), LengthDist.fixed(20))
    slo, cluster = SLO(0.5, 0.05, 0.9), Cluster(gpus_per_node=2, nodes=2)
    configured = plan(prof, w, slo, cluster, num_requests=200, check=False)
    assert configured.locality == "any" and configured.handoff_p90_s["cross-node"] == pytest.approx(0.008)
    link = choose_link(cluster, measured(1.0), "any")
    slow = plan(prof, w, slo, link.cluster, num_requests=200, check=False, link_source=link.why)
    assert slow.handoff_p90_s["cross-node"] == pytest.approx(0.1) and slow.locality == "node"
    # the plan says which bandwidth it used
    assert to_status(slow)["kvLink"] == {"source": "measured", "intraNodeGBps": 300.0, "interNodeGBps": 1.0,
                                         "reason": link.why}
    assert to_status(configured)["kvLink"]["source"] == "configured"
    assert f"1 GB/s across ({link.why})" in format_plan(slow)
    assert "12.5 GB/s across (configured)" in format_plan(configured)


def test_a_measured_link_that_appears_or_moves_re_plans():
    basis = WorkloadBasis(5.0, 700.0, None, 200.0, None)
    planned = basis.to_status()
    assert "kvLinkGBps" not in planned and not moved(basis, planned, 0.2)
    with_link = WorkloadBasis(5.0, 700.0, None, 200.0, None, kv_link_gb_s=2.0)
    assert moved(with_link, planned, 0.2)  # the plan used the configured constant: re-plan with the measurement
    planned = with_link.to_status()
    assert planned["kvLinkGBps"] == 2.0 and not moved(with_link, planned, 0.2)
    assert not moved(WorkloadBasis(5.0, 700.0, None, 200.0, None, kv_link_gb_s=2.3), planned, 0.2)
    assert moved(WorkloadBasis(5.0, 700.0, None, 200.0, None, kv_link_gb_s=1.0), planned, 0.2)
    assert not moved(basis, planned, 0.2)  # no hand-offs in this window: keep the plan


class _Client:
    """PrometheusSource's client, answering each query by the metric it names."""

    def __init__(self, answers: dict[str, float | None]) -> None:
        self.answers, self.queries = answers, []

    async def value(self, query: str) -> float | None:
        self.queries.append(query)
        return next((v for k, v in self.answers.items() if k in query), None)


def test_the_planners_prometheus_numbers_include_the_kv_hand_offs():
    src = PrometheusSource(_Client({"baton_kv_transfer_bytes_total": 4e9, "baton_kv_transfer_seconds_sum": 2.0,
                                    "baton_kv_transfer_seconds_count": 0.5}))
    numbers = asyncio.run(src.workload("chat", "ml", 300))
    assert (numbers["kv_bytes_per_s"], numbers["kv_seconds_per_s"], numbers["kv_transfers_per_s"]) == (4e9, 2.0, 0.5)
    sel = 'llmservice="chat",namespace="ml"'
    assert f"sum(rate(baton_kv_transfer_bytes_total{{{sel}}}[5m]))" in src.client.queries
    assert f"sum(rate(baton_kv_transfer_seconds_sum{{{sel}}}[5m]))" in src.client.queries


def test_an_online_round_plans_with_the_measured_link_and_no_pipeline(monkeypatch):
    from baton.operator.planner import online

    seen = {}
    real_plan = online.plan

    def spy(*args, **kwargs):
        seen.update(cluster=args[3], **kwargs)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(online, "plan", spy)
    body = svc_dict(mode="recommend")
    body["spec"]["model"].update(name="opt-13b", maxModelLen=2048)
    body["spec"]["engine"] = {"kind": "vllm", "image": "vllm/vllm-openai:v0.10.1"}
    body["spec"]["autoscaling"] = {"prometheusURL": "http://p:9090"}
    body["spec"]["planner"].update({"profileModel": "facebook/opt-13b", "window": "5m",
                                    "cluster": {"gpusPerNode": 4, "nodes": 2, "interNodeGBps": 12.5}})
    source = _Source()
    # 300 hand-offs in 5 minutes at 2.5 GB/s effective
    source.numbers.update(kv_bytes_per_s=5e9, kv_seconds_per_s=2.0, kv_transfers_per_s=1.0)
    kube = _Kube(body)
    asyncio.run(online.tick(kube, asyncio.Lock(), "n", "s", _State(source), lambda *e: None, lambda: None))
    assert seen["pipeline"] is False  # an LLMService cannot run a pipelined plan
    assert seen["cluster"].inter_node_gb_s == pytest.approx(2.5) and seen["cluster"].intra_node_gb_s == 300
    status = kube.body["status"]["plan"]
    assert status["kvLink"]["source"] == "measured" and status["kvLink"]["interNodeGBps"] == 2.5
    assert status["basis"]["kvLinkGBps"] == 2.5
    # without hand-offs in the window: the configured constant, and the status says so
    source.numbers.update(kv_bytes_per_s=None, kv_seconds_per_s=None, kv_transfers_per_s=None, rate=60.0)
    asyncio.run(online.tick(kube, asyncio.Lock(), "n", "s", _State(source), lambda *e: None, lambda: None))
    assert seen["cluster"].inter_node_gb_s == 12.5
    assert kube.body["status"]["plan"]["kvLink"]["source"] == "configured"


def test_a_decode_only_fleet_measures_its_prompt_lengths_on_its_decode_workers():
    """After a colocated plan is applied (prefill replicas 0) no prefill worker counts requests; the decode
    workers compute the prompts and count their lengths, so the planner keeps measuring (not `NoTraffic` forever,
    which would never let it plan the fleet back up)."""

    class Client(_Client):
        async def value(self, query: str) -> float | None:
            self.queries.append(query)
            what = "p90" if "histogram_quantile" in query else "mean" if " / " in query else "count"
            if "request_prompt_tokens" in query:
                if 'role=~"prefill|both"' in query:
                    return None  # no prefill worker
                return {"p90": 30.0, "mean": 6.0, "count": 2.0}[what] if 'role=~"decode"' in query else None
            if "request_generation_tokens" in query:
                return {"p90": 16.0, "mean": 16.0, "count": 2.0}[what]
            return 2.0 if "baton_router_ttft_seconds_count" in query else None

    numbers = asyncio.run(PrometheusSource(Client({})).workload("chat", "ml", 300))
    assert numbers["rate"] == 2.0 and numbers["input_mean"] == 6.0 and numbers["input_p90"] == 30.0
    assert numbers["output_mean"] == 16.0
