"""The autoscaler's memory across operator restarts, without a cluster: `status.autoscaler` (autoscaler_store).

A "restart" here is a new `AutoscalerState` (kopf's memo is empty in a new process) reading the status that
the previous one wrote through the fake Kube. (The real thing, a SIGKILLed `baton operator run` against the
local control plane and a real Prometheus, is test_restart_integration.py.)
"""
from __future__ import annotations

import copy

import pytest
from baton.operator import autoscaler_store as store
from baton.operator.autoscale_policy import History
from baton.operator.autoscaler import AutoscalerState
from baton.operator.prometheus import PrometheusClient
from baton.operator.status import compute_status

from tests.operator.test_autoscaler import NAME, URL, FakeKube, llmservice, prometheus, run_tick


class Killed(BaseException):
    """The process dies here (nothing in the operator catches a BaseException that is not an Exception)."""


class OrderedKube(FakeKube):
    """Records the order of writes; `die_on_apply`: the process is killed at its next replica write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[str, dict]] = []
        self.die_on_apply = False

    def apply(self, manifest, *, field_manager="baton-operator", force=True):
        if self.die_on_apply:
            self.die_on_apply = False
            raise Killed()
        self.writes.append(("apply", copy.deepcopy(manifest)))
        return super().apply(manifest, field_manager=field_manager, force=force)

    def patch_llmservice_status(self, namespace, name, status):
        self.writes.append(("status", copy.deepcopy(status)))
        return super().patch_llmservice_status(namespace, name, status)


def state_for(ttft: float, tpot: float = 0.02) -> AutoscalerState:
    return AutoscalerState(client=PrometheusClient(URL, transport=prometheus(ttft, tpot, within=0.7), retries=0))


def test_the_decision_is_recorded_before_the_replicas_are_applied():
    kube = OrderedKube(llmservice(), {"prefill": 1, "decode": 1})
    result, _ = run_tick(kube, state_for(ttft=1.2), now=1000.0)
    assert result.scaled == {"prefill": (1, 3)}
    kinds = [kind for kind, _ in kube.writes]
    assert kinds == ["status", "apply", "status"], kube.writes
    ahead = kube.writes[0][1]["autoscaler"]
    assert ahead["pending"] == {"prefill": {"from": 1, "to": 3, "reason": "TTFTAboveSLO", "at": 1000.0}}
    assert History.from_dict(ahead["history"]).prefill.last_scale_time_s == 1000.0
    final = kube.llms["status"]["autoscaler"]
    assert "pending" not in final  # cleared once applied
    assert History.from_dict(final["history"]).prefill.last_scale_up_time_s == 1000.0


def test_no_replicas_move_when_the_decision_cannot_be_recorded():
    kube = OrderedKube(llmservice(), {"prefill": 1, "decode": 1})

    def refuse(*_):
        from baton.operator.kube import KubeError
        raise KubeError(500, "etcdserver: request timed out")

    kube.patch_llmservice_status = refuse
    result, events = run_tick(kube, state_for(ttft=1.2), now=1000.0)
    assert not kube.applied and not result.scaled
    assert [e[:2] for e in events] == [("Warning", "ScaleFailed")] and "recording the decision" in events[0][2]


def test_killed_between_record_and_apply_the_next_operator_completes_the_decision():
    kube = OrderedKube(llmservice(), {"prefill": 1, "decode": 1})
    kube.die_on_apply = True
    with pytest.raises(Killed):
        run_tick(kube, state_for(ttft=1.2), now=1000.0)
    assert kube.deployments[f"{NAME}-prefill"]["spec"]["replicas"] == 1  # decided, recorded, not applied
    assert kube.llms["status"]["autoscaler"]["pending"]["prefill"]["to"] == 3

    restarted = state_for(ttft=1.2)  # a new process: empty memo; still slow
    result, events = run_tick(kube, restarted, now=1004.0)
    assert kube.deployments[f"{NAME}-prefill"]["spec"]["replicas"] == 3
    assert events[0][:2] == ("Normal", "ScaledUp") and "recorded before the operator restarted" in events[0][2]
    # the policy goes on from the recorded scale-up: the new replicas warm up, no second latency-driven step
    assert not result.scaled and result.decisions["prefill"].reason == "WarmingUp", result.decisions
    assert "pending" not in kube.llms["status"]["autoscaler"]
    assert restarted.history.prefill.last_scale_up_time_s == 1000.0


def _timeline(kube: FakeKube, restart_at: int | None, restore: bool = True) -> list[tuple[int, int]]:
    """prefill at 3 replicas: TTFT within the hysteresis band (hold) for 40 s, then low (scale-down wanted),
    one tick every 2 s for 120 s, scale-down window 60 s; (prefill current, desired) per tick. With
    `restart_at`, the state is thrown away at that tick (a new process), as an operator restart does."""
    state = None
    out = []
    for i, t in enumerate(range(0, 120, 2)):
        ttft = 0.4 if t < 40 else 0.08
        if state is None or i == restart_at:
            state = AutoscalerState(restored=not restore)
        state.client = PrometheusClient(URL, transport=prometheus(ttft, 0.02), retries=0)
        result, _ = run_tick(kube, state, now=10_000.0 + t)
        d = result.decisions["prefill"]
        out.append((d.current, d.desired))
    return out


def test_a_restarted_autoscaler_decides_exactly_as_one_that_never_stopped():
    spec = {"scaleDownStabilization": "60s"}
    undisturbed = _timeline(FakeKube(llmservice(**spec), {"prefill": 3, "decode": 1}), restart_at=None)
    downs = [i for i, (cur, want) in enumerate(undisturbed) if want < cur]
    assert downs, undisturbed
    # the hold recommendations before 40 s keep replicas until they leave the 60 s window: not before 100 s
    assert downs[0] * 2 > 40 + 58, undisturbed
    restart = 35  # 70 s: while the window that started at 40 s runs
    assert _timeline(FakeKube(llmservice(**spec), {"prefill": 3, "decode": 1}), restart) == undisturbed
    # without the persisted history the window would start over at the restart (and this test would notice)
    fresh = _timeline(FakeKube(llmservice(**spec), {"prefill": 3, "decode": 1}), restart, restore=False)
    assert fresh != undisturbed


def test_store_patches_replace_and_unfinished_actions_are_judged_against_the_deployments():
    assert store.replacing({"a": 1, "b": {"c": 2}}, {"a": 0, "b": {"c": 1, "old": 5}, "gone": 1}) == {
        "a": 1, "b": {"c": 2, "old": None}, "gone": None}
    pending = {"prefill": {"from": 1, "to": 3, "reason": "TTFTAboveSLO", "at": 100.0},
               "decode": {"from": 2, "to": 1, "reason": "BelowSLOScaleDown", "at": 100.0}}
    assert store.unfinished(pending, {"prefill": 1, "decode": 2}, 110.0, 60.0) == {
        "prefill": (1, 3, "TTFTAboveSLO"), "decode": (2, 1, "BelowSLOScaleDown")}
    # applied already / scaled by someone else since / too old / garbage: nothing to complete
    assert store.unfinished(pending, {"prefill": 3, "decode": 4}, 110.0, 60.0) == {}
    assert store.unfinished(pending, {"prefill": 1, "decode": 2}, 200.0, 60.0) == {}
    assert store.unfinished({"prefill": {"from": "x"}, "decode": 7}, {"prefill": 1}, 110.0, 60.0) == {}
    assert store.restore({"history": {"prefill": {"recommendations": "garbage"}}})[0] == History()
    assert store.restore(None) == (History(), {})


def test_switching_autoscaling_off_clears_the_persisted_history():
    body = llmservice()
    body["status"]["autoscaler"] = {"history": {"prefill": {"started": 1.0}}}
    assert "autoscaler" not in compute_status(body, {}, "2026-01-01T00:00:00Z")
    body["spec"]["autoscaling"]["enabled"] = False
    assert compute_status(body, {}, "2026-01-01T00:00:00Z")["autoscaler"] is None
