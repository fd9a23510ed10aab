"""The autoscaler loop's wiring without a cluster: a fake Kube, Prometheus answers from httpx.MockTransport.

(The real thing, with the apiserver and a real Prometheus, is test_autoscaler_integration.py.)
"""
from __future__ import annotations

import asyncio
import copy

import httpx
import pytest
from baton.e2e.prometheus import free_port
from baton.operator import api, autoscaler
from baton.operator.autoscale_policy import PolicyConfig, decide
from baton.operator.autoscaler import AutoscalerState, role_observations, slo_condition, slo_status, tick
from baton.operator.kube import AUTOSCALER_FIELD_MANAGER
from baton.operator.prometheus import (
    LatencySignal,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
    RoleLoad,
    ServiceMetrics,
)

NS, NAME = "team-a", "chat"
URL = "http://prometheus.test:9090"


def llmservice(**autoscaling) -> dict:
    return {
        "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NS, "generation": 3, "uid": "u-1"},
        "spec": {
            "model": {"name": "m", "source": {"hostPath": {"path": "/models/m"}}},
            "slo": {"ttft": "500ms", "tpot": "50ms", "attainment": 0.9},
            "prefill": {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            "decode": {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            "autoscaling": {"enabled": True, "prometheusURL": URL, "interval": "2s",
                            "scaleDownStabilization": "10m", **autoscaling},
        },
        "status": {"phase": "Ready", "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllRolesReady", "message": "ok",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "prefill": {"replicas": 1, "readyReplicas": 1, "desiredReplicas": 1, "ready": "1/1"}},
    }


class FakeKube:
    """The calls the autoscaler makes, on in-memory objects."""

    def __init__(self, llms: dict, replicas: dict[str, int]) -> None:
        self.llms = llms
        self.deployments = {f"{NAME}-{role}": {"metadata": {"name": f"{NAME}-{role}", "namespace": NS},
                                               "spec": {"replicas": n}, "status": {"readyReplicas": n}}
                            for role, n in replicas.items()}
        self.applied: list[tuple[dict, str]] = []
        self.status_patches: list[dict] = []

    def get(self, api_version, kind, namespace, name):
        if kind == "LLMService":
            return copy.deepcopy(self.llms) if name == NAME else None
        return copy.deepcopy(self.deployments.get(name))

    def apply(self, manifest, *, field_manager="baton-operator", force=True):
        self.applied.append((manifest, field_manager))
        dep = self.deployments[manifest["metadata"]["name"]]
        dep["spec"]["replicas"] = manifest["spec"]["replicas"]
        return copy.deepcopy(dep)

    def patch_llmservice_status(self, namespace, name, status):
        self.status_patches.append(copy.deepcopy(status))
        merged = self.llms.setdefault("status", {})
        for key, value in status.items():
            if isinstance(value, dict):
                entry = merged.setdefault(key, {})
                for k, v in value.items():
                    if v is None:
                        entry.pop(k, None)
                    else:
                        entry[k] = v
            else:
                merged[key] = value
        return self.llms


def prometheus(ttft_p90: float, tpot_p90: float, within: float = 1.0):
    """A Prometheus that answers the source's queries: router p90s, buckets with `within` under each SLO."""

    def handler(request: httpx.Request) -> httpx.Response:
        query = dict(httpx.QueryParams(request.content.decode()))["query"]
        router = "baton_router_" in query
        if query.startswith("histogram_quantile"):
            value = ttft_p90 if "ttft" in query else tpot_p90
            result = [{"metric": {}, "value": [0, str(value)]}] if router else []
        elif query.startswith("sum by (le)"):
            bounds = ("0.1", "0.5", "1.0") if "ttft" in query else ("0.01", "0.05", "0.1")
            result = [{"metric": {"le": le}, "value": [0, str(10 * within if i < 2 else 10)]}
                      for i, le in enumerate(bounds)] + [{"metric": {"le": "+Inf"}, "value": [0, "10"]}]
            result = result if router else []
        elif "kv_cache_usage" in query:
            result = [{"metric": {"role": "decode"}, "value": [0, "0.3"]}]
        else:
            result = []
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})

    return httpx.MockTransport(handler)


def state_with(transport: httpx.MockTransport) -> AutoscalerState:
    return AutoscalerState(client=PrometheusClient(URL, transport=transport, retries=0))


def run_tick(kube: FakeKube, state: AutoscalerState, now: float = 1000.0):
    events: list[tuple[str, str, str]] = []
    result = asyncio.run(tick(kube, asyncio.Lock(), NS, NAME, state, lambda *e: events.append(e), now_s=now))
    return result, events


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_ttft_violation_scales_prefill_with_the_autoscaler_field_manager():
    kube = FakeKube(llmservice(), {"prefill": 1, "decode": 1})
    result, events = run_tick(kube, state_with(prometheus(ttft_p90=1.2, tpot_p90=0.02, within=0.7)))

    assert result.scaled == {"prefill": (1, 3)}  # ceil(1 x 1.2/0.5) = 3
    assert kube.applied == [({"apiVersion": "apps/v1", "kind": "Deployment",
                              "metadata": {"name": f"{NAME}-prefill", "namespace": NS},
                              "spec": {"replicas": 3}}, AUTOSCALER_FIELD_MANAGER)]
    status = kube.llms["status"]
    assert status["prefill"]["desiredReplicas"] == 3 and status["prefill"]["lastScaleReason"] == "TTFTAboveSLO"
    assert status["prefill"]["lastScaleTime"].endswith("Z") and status["prefill"]["readyReplicas"] == 1
    assert status["decode"] == {"desiredReplicas": 1}
    assert status["slo"] == {"ttftP90": "1.2s", "tpotP90": "20ms", "attainment": 0.49, "window": "1m"}
    slo = condition(status, "SLOMet")
    assert (slo["status"], slo["reason"]) == ("False", "TTFTAboveSLO")
    assert "TTFT p90 1.2s > SLO 500ms" in slo["message"] and "attainment 0.490 < 0.9" in slo["message"]
    assert condition(status, "Ready")["reason"] == "AllRolesReady"  # the reconciler's conditions are kept
    assert events == [("Normal", "ScaledUp",
                       "prefill 1 -> 3 replicas: TTFTAboveSLO: prefill: TTFT p90 1200ms > SLO 500ms")]
    assert autoscaler.DESIRED_REPLICAS.labels(NAME, NS, "prefill")._value.get() == 3


def test_within_slo_holds_and_rewrites_nothing_the_second_time():
    kube = FakeKube(llmservice(), {"prefill": 2, "decode": 2})
    state = state_with(prometheus(ttft_p90=0.4, tpot_p90=0.04))
    result, events = run_tick(kube, state)
    assert not result.scaled and not kube.applied and events == []
    assert condition(kube.llms["status"], "SLOMet")["status"] == "True"
    assert kube.llms["status"]["slo"]["attainment"] == 1.0
    patches = len(kube.status_patches)
    run_tick(kube, state, now=1002.0)
    # nothing changed but the persisted history (one more recommendation): nothing else is rewritten
    assert [set(p) for p in kube.status_patches[patches:]] == [{"autoscaler"}]


def test_unreachable_prometheus_holds_replicas_and_warns_once_per_transition():
    kube = FakeKube(llmservice(prometheusURL=f"http://127.0.0.1:{free_port()}"), {"prefill": 2, "decode": 1})
    kube.llms["status"]["slo"] = {"ttftP90": "300ms", "tpotP90": "20ms", "attainment": 0.95, "window": "1m"}
    state = AutoscalerState()
    result, events = run_tick(kube, state)
    assert not kube.applied and not result.scaled
    assert result.decisions["prefill"].desired == 2 and result.decisions["prefill"].reason == "PrometheusUnreachable"
    status = kube.llms["status"]
    slo = condition(status, "SLOMet")
    assert (slo["status"], slo["reason"]) == ("Unknown", "PrometheusUnreachable") and "127.0.0.1" in slo["message"]
    assert status["slo"] == {"window": "1m"}  # stale numbers removed
    assert [e[:2] for e in events] == [("Warning", "PrometheusUnreachable")]
    _, again = run_tick(kube, state, now=1002.0)
    assert again == []  # not every tick

    # Back: one Normal Event, decisions resume.
    asyncio.run(state.close())
    state.client = PrometheusClient(kube.llms["spec"]["autoscaling"]["prometheusURL"],
                                    transport=prometheus(0.3, 0.02), retries=0)
    _, back = run_tick(kube, state, now=1004.0)
    assert [e[:2] for e in back] == [("Normal", "PrometheusReachable")]
    assert condition(kube.llms["status"], "SLOMet")["status"] == "True"


def test_not_enabled_or_gone_does_nothing():
    kube = FakeKube(llmservice(enabled=False), {"prefill": 1, "decode": 1})
    assert run_tick(kube, AutoscalerState())[0] is None and not kube.status_patches
    kube.llms["metadata"]["name"] = "other"
    assert run_tick(kube, AutoscalerState())[0] is None


def test_slo_condition_and_status_rules():
    slo = api.SLOSpec(ttft="500ms", tpot="50ms", attainment=0.9)
    m = ServiceMetrics(window=60, ttft=LatencySignal(p90=0.3, within_slo=0.99, source="router"),
                       tpot=LatencySignal(p90=0.08, within_slo=0.8, source="workers"), attainment=0.792)
    status, reason, message = slo_condition(m, slo)
    assert (status, reason) == ("False", "TPOTAboveSLO")
    assert "TPOT p90 80ms > SLO 50ms (from the workers)" in message and "window 1m" in message
    both = ServiceMetrics(window=60, ttft=LatencySignal(p90=0.6), tpot=LatencySignal(p90=0.06))
    assert slo_condition(both, slo)[1] == "TTFTAndTPOTAboveSLO"
    low = ServiceMetrics(window=60, ttft=LatencySignal(p90=0.3), tpot=LatencySignal(p90=0.03), attainment=0.5)
    assert slo_condition(low, slo)[:2] == ("False", "AttainmentBelowTarget")
    assert slo_condition(ServiceMetrics(window=60), slo)[:2] == ("Unknown", "NoTraffic")
    err = PrometheusQueryError(URL, "x", "bad_data: parse error")
    assert slo_condition(None, slo, err)[:2] == ("Unknown", "PrometheusQueryFailed")
    assert slo_condition(None, slo, PrometheusUnavailable(URL, "refused"))[1] == "PrometheusUnreachable"
    assert slo_status(m, 60) == {"ttftP90": "300ms", "tpotP90": "80ms", "attainment": 0.792, "window": "1m"}
    assert slo_status(ServiceMetrics(window=8, ttft=LatencySignal(p90=0.12345)), 8)["ttftP90"] == "123.5ms"


def test_role_observations_map_metrics_and_deployments():
    m = ServiceMetrics(window=30, ttft=LatencySignal(p90=0.7), tpot=LatencySignal(p90=0.03),
                       roles={"prefill": RoleLoad(waiting=4, prompt_tokens_per_second=900, running=2),
                              "decode": RoleLoad(kv_cache_usage=0.5, running=12, waiting=0)})
    deps = {"prefill": {"spec": {"replicas": 3}, "status": {"readyReplicas": 2}}, "decode": None}
    obs = role_observations(m, deps, 123.0)
    assert (obs.prefill.ttft_p90_s, obs.prefill.num_waiting, obs.prefill.prompt_tokens_per_s) == (0.7, 4, 900)
    assert (obs.prefill.current_replicas, obs.prefill.ready_replicas) == (3, 2)
    assert (obs.decode.tpot_p90_s, obs.decode.kv_cache_usage, obs.decode.num_running) == (0.03, 0.5, 12)
    assert obs.decode.current_replicas is None and obs.window_s == 30 and obs.now_s == 123.0
    assert obs.prefill.prefill_tokens_per_s is None and obs.prefill.busy_fraction is None  # vLLM: no busy time


def test_prefill_capacity_is_prompt_tokens_per_busy_second():
    """Baton workers' busy time turns on the policy's capacity-based prefill rules (load, backlog, forecast)."""
    def obs(**load):
        m = ServiceMetrics(window=30, roles={"prefill": RoleLoad(**load), "decode": RoleLoad(busy_fraction=0.6)})
        return role_observations(m, {}, 0.0)

    o = obs(prompt_tokens_per_second=900, busy_seconds_per_second=0.5, busy_fraction=0.25)
    assert o.prefill.prefill_tokens_per_s == 1800 and o.prefill.busy_fraction == 0.25
    assert o.decode.busy_fraction == 0.6
    assert autoscaler.prefill_capacity(RoleLoad(prompt_tokens_per_second=900)) is None  # no busy series
    assert autoscaler.prefill_capacity(RoleLoad(prompt_tokens_per_second=5, busy_seconds_per_second=0.01)) is None
    assert autoscaler.prefill_capacity(RoleLoad(prompt_tokens_per_second=0, busy_seconds_per_second=0.0)) is None
    assert autoscaler.prefill_capacity(None) is None



def test_busy_prefill_workers_scale_prefill_on_load():
    """The wiring end to end (Prometheus numbers -> observations -> policy): one prefill replica busy all the
    time is at its capacity, above the policy's target utilisation -> LoadAboveCapacity, before TTFT moves.
    Without the busy series (vLLM workers) the same numbers hold (TTFT within SLO)."""
    deps = {r: {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}} for r in ("prefill", "decode")}

    def prefill_decision(**load):
        m = ServiceMetrics(window=30, ttft=LatencySignal(p90=0.1), tpot=LatencySignal(p90=0.01),
                           roles={"prefill": RoleLoad(prompt_tokens_per_second=3600, waiting=0, **load),
                                  "decode": RoleLoad(kv_cache_usage=0.1, running=1, waiting=0)})
        decisions, _ = decide(role_observations(m, deps, 1000.0), PolicyConfig())
        return decisions["prefill"]

    busy = prefill_decision(busy_seconds_per_second=1.0, busy_fraction=1.0)
    assert (busy.reason, busy.desired) == ("LoadAboveCapacity", 2), busy
    assert prefill_decision().desired == 1


@pytest.mark.parametrize(("interval", "window"), [(2, 60), (15, 60), (30, 120)])
def test_default_window(interval, window):
    assert autoscaler.window_for(interval) == window
