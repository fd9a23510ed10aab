"""Who scales a worker role: `spec.autoscaling.mode` / `spec.<role>.autoscaling.mode` = baton | external | off
(issue 22), without a cluster.

- The API: the mode a role gets (its own, else the service's, else the legacy `enabled`), and the refusals
  that name the field (`enabled: true` with another mode; mode baton without Prometheus).
- render: only mode off writes a role Deployment's `spec.replicas`.
- reconcile's pure decisions (`initial_replicas`, `replicas_handover`), and reconcile itself against an
  in-memory apiserver that keeps server-side apply's ownership of `spec.replicas` the way Kubernetes does (a
  field its last owner stops applying is removed and defaulted back to 1): with mode external a `kubectl
  scale` stays across reconciles, also after switching from off; with mode baton a manual scale inside the
  bounds stays and one outside is clamped (what README says).
- The autoscaler: a role in mode external is never decided on, recorded as pending or scaled.

The same on a real apiserver: test_autoscaling_mode_integration.py.
"""
from __future__ import annotations

import copy
import itertools

import pytest
from baton.operator import api
from baton.operator.autoscale_policy import (
    History,
    Observations,
    PolicyConfig,
    RoleHistory,
    RoleObservation,
    decide,
)
from baton.operator.autoscale_rules import NOT_MANAGED
from baton.operator.kube import AUTOSCALER_FIELD_MANAGER, FIELD_MANAGER
from baton.operator.reconcile import (
    HANDOVER_FIELD_MANAGER,
    initial_replicas,
    reconcile,
    replicas_handover,
)
from baton.operator.render import render
from baton.operator.status import compute_status

from tests.operator.test_reconcile_kv_secret import FakeKube, merge_patch

NS, NAME = "team", "svc"
URL = "http://prometheus:9090"


def body(**spec) -> dict:
    out = {
        "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NS, "uid": "llms-uid", "generation": 1},
        "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}}, "engine": {"kind": "baton"}},
    }
    out["spec"].update(copy.deepcopy(spec))
    return out


# ------------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize(("spec", "prefill", "decode"), [
    ({}, "off", "off"),
    ({"autoscaling": {"enabled": False}}, "off", "off"),
    ({"autoscaling": {"enabled": True, "prometheusURL": URL}}, "baton", "baton"),  # the older spelling
    ({"autoscaling": {"enabled": True, "mode": "baton", "prometheusURL": URL}}, "baton", "baton"),
    ({"autoscaling": {"mode": "external"}}, "external", "external"),
    ({"autoscaling": {"mode": False}}, "off", "off"),  # YAML's unquoted off
    ({"decode": {"autoscaling": {"mode": "external"}}}, "off", "external"),
    ({"autoscaling": {"enabled": True, "prometheusURL": URL}, "decode": {"autoscaling": {"mode": "external"}}},
     "baton", "external"),  # a role's own mode refines the service's
    ({"autoscaling": {"mode": "baton", "prometheusURL": URL}, "prefill": {"autoscaling": {"mode": "off"}}},
     "off", "baton"),
])
def test_the_mode_of_each_role(spec, prefill, decode):
    parsed = api.parse_llmservice(body(**spec)).spec
    assert (parsed.autoscaling_mode("prefill"), parsed.autoscaling_mode("decode")) == (prefill, decode)
    # the raw-dict reading (reconcile, kopf filters, status) agrees with the parsed one
    assert (api.autoscaling_mode(body(**spec)["spec"], "prefill"),
            api.autoscaling_mode(body(**spec)["spec"], "decode")) == (prefill, decode)
    assert api.baton_autoscales(body(**spec)["spec"]) == ("baton" in (prefill, decode))


@pytest.mark.parametrize("mode", ["external", "off"])
def test_enabled_true_contradicting_the_mode_is_refused_naming_enabled(mode):
    problems = api.validation_errors(body(autoscaling={"enabled": True, "mode": mode, "prometheusURL": URL}))
    assert problems == [(f"spec.autoscaling.enabled: true means mode baton, which contradicts mode {mode}: "
                         "remove enabled (mode replaces it)")]


def test_mode_baton_needs_prometheus_and_external_does_not():
    assert api.validation_errors(body(decode={"autoscaling": {"mode": "baton"}})) == [(
        "spec.autoscaling.prometheusURL: is required when the autoscaling mode of decode is baton (Baton's "
        "autoscaler reads the SLO metrics there)")]
    assert api.validation_errors(body(autoscaling={"mode": "external"})) == []


def test_replica_bounds_are_checked_for_baton_roles_only():
    # external: replicas is the starting size and the bounds are the outside autoscaler's (e.g. the HPA's)
    assert api.validation_errors(body(decode={"replicas": 20, "autoscaling": {"mode": "external"}})) == []
    assert api.validation_errors(body(decode={"replicas": 20, "autoscaling": {"mode": "baton"}},
                                      autoscaling={"prometheusURL": URL})) == [(
        "spec.decode.replicas: must lie within decode.autoscaling [minReplicas 1, maxReplicas 8] while Baton "
        "autoscales decode (autoscaling mode baton), got 20")]


# ------------------------------------------------------------------------------------------------ render


def replicas_of(manifests: list[dict]) -> dict[str, int | None]:
    return {m["metadata"]["labels"]["baton.dev/role"]: m["spec"].get("replicas")
            for m in manifests if m["kind"] == "Deployment"}


def test_only_mode_off_renders_a_roles_replicas():
    spec = {"prefill": {"replicas": 2, "autoscaling": {"mode": "baton"}}, "decode": {"replicas": 3},
            "autoscaling": {"mode": "external", "prometheusURL": URL}, "router": {"replicas": 1}}
    assert replicas_of(render(body(**spec))) == {"prefill": None, "decode": None, "router": 1}
    spec["decode"]["autoscaling"] = {"mode": "off"}
    assert replicas_of(render(body(**spec))) == {"prefill": None, "decode": 3, "router": 1}


# ------------------------------------------------------------------------------ reconcile: pure decisions


def deployment(replicas: int, *owners: str) -> dict:
    return {"metadata": {"name": f"{NAME}-decode", "namespace": NS, "managedFields": [
        {"manager": m, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}
        for m in owners]}, "spec": {"replicas": replicas}}


def test_initial_replicas():
    assert initial_replicas("baton", 12, 1, 8) == 8  # clamped into Baton's bounds
    assert initial_replicas("external", 12, 1, 8) == 12  # as written: the outside autoscaler's bounds rule


@pytest.mark.parametrize(("mode", "live", "want"), [
    # off: render writes the spec's replicas itself
    ("off", deployment(3, FIELD_MANAGER), None),
    # external: never a new value; the live one is handed over once, only while baton-operator alone owns it
    ("external", deployment(3, FIELD_MANAGER), (3, HANDOVER_FIELD_MANAGER)),
    ("external", deployment(3, FIELD_MANAGER, HANDOVER_FIELD_MANAGER), None),
    ("external", deployment(5, "kubectl"), None),
    ("external", deployment(12, "kube-controller-manager"), None),  # an HPA beyond Baton's bounds: not clamped
    ("external", deployment(0, FIELD_MANAGER, "keda"), None),
    ("external", deployment(4, AUTOSCALER_FIELD_MANAGER), None),  # from baton: nothing to hand over
    ("external", deployment(4), None),  # nobody owns it: baton-operator's apply cannot remove it
    # baton: the autoscaler's manager owns it, clamped into [min, max]
    ("baton", deployment(3, FIELD_MANAGER), (3, AUTOSCALER_FIELD_MANAGER)),
    ("baton", deployment(3, AUTOSCALER_FIELD_MANAGER), None),
    ("baton", deployment(12, AUTOSCALER_FIELD_MANAGER), (8, AUTOSCALER_FIELD_MANAGER)),
    ("baton", deployment(5, "kubectl"), (5, AUTOSCALER_FIELD_MANAGER)),  # a manual scale in bounds stays
])
def test_replicas_handover(mode, live, want):
    assert replicas_handover(mode, live, 1, 8) == want


# ------------------------------------------------------------------- reconcile against a modelled apiserver


class OwnershipKube(FakeKube):
    """test_reconcile_kv_secret's in-memory apiserver, plus server-side apply's ownership of a Deployment's
    `spec.replicas` as Kubernetes keeps it: an apply that sets the field makes its manager an owner (the only
    one when the value changes: applies are forced); an apply without the field by one of its owners releases
    it, and a field without owners is removed, which the Deployment defaults back to 1 replica. `scale` is
    `kubectl scale` (the /scale subresource): an update that takes the field over when the apiserver records
    managers for it (Kubernetes >= 1.21) or leaves the owners as they were (1.20 records none for /scale)."""

    def __init__(self, llmservice: dict, scale_records_manager: bool = True) -> None:
        super().__init__(llmservice)
        self.owners: dict[str, set[str]] = {}
        self.replica_writes: list[tuple[str, str, int]] = []  # (deployment, manager, value) of every apply
        self.scale_records_manager = scale_records_manager

    def apply(self, manifest, *, field_manager=FIELD_MANAGER, force=True):
        if manifest["kind"] != "Deployment":
            return super().apply(manifest, field_manager=field_manager, force=force)
        name = manifest["metadata"]["name"]
        key = ("Deployment", name)
        live = copy.deepcopy(self.objects.get(key) or {"metadata": {}, "spec": {}})
        owners = self.owners.setdefault(name, set())
        spec = manifest.get("spec") or {}
        if "replicas" in spec:
            self.replica_writes.append((name, field_manager, spec["replicas"]))
            if live["spec"].get("replicas") != spec["replicas"]:
                owners.clear()
            owners.add(field_manager)
        elif field_manager in owners:
            owners.discard(field_manager)
            if not owners:
                live["spec"].pop("replicas", None)
        self.calls.append(("apply", "Deployment", name))
        merge_patch(live, copy.deepcopy(manifest))
        live["spec"].setdefault("replicas", 1)  # the Deployment's default
        live["metadata"].setdefault("uid", next(self.uids))
        live["metadata"]["resourceVersion"] = str(next(self.versions))
        self._managed(live)
        self.objects[key] = live
        return copy.deepcopy(live)

    def scale(self, role: str, replicas: int, manager: str = "kubectl") -> None:
        name = f"{NAME}-{role}"
        live = self.objects[("Deployment", name)]
        if self.scale_records_manager and live["spec"].get("replicas") != replicas:
            self.owners[name] = {manager}
        live["spec"]["replicas"] = replicas
        live["metadata"]["resourceVersion"] = str(next(self.versions))
        self._managed(live)

    def _managed(self, live: dict) -> None:
        owners = self.owners.get(live["metadata"]["name"], set())
        live["metadata"]["managedFields"] = [
            {"manager": m, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}} for m in sorted(owners)]

    def replicas(self, role: str) -> int:
        return self.objects[("Deployment", f"{NAME}-{role}")]["spec"]["replicas"]

    def edit_spec(self, **spec) -> None:
        merge_patch(self.llms["spec"], copy.deepcopy(spec))
        self.llms["metadata"]["generation"] += 1


def reconciled(kube: OwnershipKube) -> None:
    result = reconcile(kube, NS, NAME, lambda *_: None)
    assert result is not None and result.error is None, result and result.error


def unrelated_edits() -> itertools.cycle:
    """Spec edits that make the reconciler re-apply Deployments: one the router reads (only the router rolls) and
    engine arguments (the workers roll: the decode Deployment is applied without replicas)."""
    return itertools.cycle([{"router": {"prefillFailure": {"retries": 2}}},
                            {"engine": {"args": ["--max-num-seqs", "8"]}},
                            {"router": {"prefillFailure": {"retries": 3}}},
                            {"engine": {"args": ["--max-num-seqs", "16"]}}])


@pytest.mark.parametrize("records", [True, False], ids=["scale-records-manager", "k8s-1.20-scale"])
def test_external_mode_never_fights_kubectl_scale(records):
    kube = OwnershipKube(body(decode={"replicas": 2, "autoscaling": {"mode": "external"}}),
                         scale_records_manager=records)
    reconciled(kube)
    assert kube.replicas("decode") == 2  # created at the spec's replicas, then the outside autoscaler's
    kube.scale("decode", 3)
    edits = unrelated_edits()
    for _ in range(4):
        kube.edit_spec(**next(edits))
        reconciled(kube)
        assert kube.replicas("decode") == 3
    # the spec's replicas is the starting size only: changing it writes nothing either
    kube.edit_spec(decode={"replicas": 5})
    reconciled(kube)
    assert kube.replicas("decode") == 3
    decode_writes = [w for w in kube.replica_writes if w[0] == f"{NAME}-decode"]
    assert decode_writes == [(f"{NAME}-decode", FIELD_MANAGER, 2), (f"{NAME}-decode", HANDOVER_FIELD_MANAGER, 2)]


@pytest.mark.parametrize("records", [True, False], ids=["scale-records-manager", "k8s-1.20-scale"])
def test_switching_off_to_external_keeps_the_replicas(records):
    kube = OwnershipKube(body(decode={"replicas": 2}), scale_records_manager=records)
    reconciled(kube)
    assert kube.owners[f"{NAME}-decode"] == {FIELD_MANAGER}
    kube.edit_spec(decode={"autoscaling": {"mode": "external"}})
    reconciled(kube)
    # a pod template change: baton-operator applies the decode Deployment without replicas, which would reset
    # them to 1 had nobody else owned the field
    kube.edit_spec(engine={"args": ["--max-num-seqs", "8"]})
    reconciled(kube)
    assert kube.replicas("decode") == 2
    kube.scale("decode", 3)
    kube.edit_spec(engine={"args": ["--max-num-seqs", "16"]})
    reconciled(kube)
    assert kube.replicas("decode") == 3
    assert FIELD_MANAGER not in kube.owners[f"{NAME}-decode"]


def test_baton_mode_keeps_a_manual_scale_inside_the_bounds_and_clamps_one_outside():
    kube = OwnershipKube(body(decode={"replicas": 2, "autoscaling": {"mode": "baton", "maxReplicas": 4}},
                              autoscaling={"prometheusURL": URL}))
    reconciled(kube)
    assert kube.owners[f"{NAME}-decode"] >= {AUTOSCALER_FIELD_MANAGER}
    kube.scale("decode", 3)
    kube.edit_spec(router={"prefillFailure": {"retries": 2}})
    reconciled(kube)
    assert kube.replicas("decode") == 3  # the reconciler keeps it; the autoscaler's next tick starts from it
    kube.scale("decode", 6)
    reconciled(kube)
    assert kube.replicas("decode") == 4  # clamped to maxReplicas


def test_status_keeps_the_autoscalers_memory_only_while_a_role_is_in_mode_baton():
    previous = {"autoscaler": {"history": {}}}
    for spec, kept in (({"decode": {"autoscaling": {"mode": "baton"}}}, True),
                       ({"autoscaling": {"enabled": True}}, True),
                       ({"autoscaling": {"mode": "external"}}, False),
                       ({}, False)):
        status = compute_status({**body(**spec), "status": previous}, {}, "2026-01-01T00:00:00Z")
        assert ("autoscaler" not in status) == kept, spec


# ------------------------------------------------------------------------------------------------ autoscaler


def test_the_policy_holds_a_role_it_does_not_manage_and_keeps_no_history_for_it():
    # decode's TPOT is 4x its SLO: Baton would scale it up, were it Baton's
    obs = Observations(
        prefill=RoleObservation(ttft_p90_s=2.0, current_replicas=1, ready_replicas=1),
        decode=RoleObservation(tpot_p90_s=0.2, kv_cache_usage=0.95, current_replicas=1, ready_replicas=1),
        window_s=60, now_s=1000)
    both, _ = decide(obs, PolicyConfig())
    assert both["decode"].desired > 1 and both["prefill"].desired > 1
    stale = History(decode=RoleHistory(started_s=1.0, last_scale_reason="TPOTAboveSLO"))
    decisions, history = decide(obs, PolicyConfig(managed=("prefill",)), stale)
    assert decisions["prefill"].desired > 1
    assert (decisions["decode"].current, decisions["decode"].desired, decisions["decode"].reason) == (1, 1, NOT_MANAGED)
    assert history.decode == RoleHistory()  # handed back to Baton later, it starts afresh


def test_policy_config_manages_the_baton_roles():
    spec = api.parse_llmservice(body(autoscaling={"mode": "baton", "prometheusURL": URL},
                                     decode={"autoscaling": {"mode": "external"}})).spec
    assert PolicyConfig.from_spec(spec).managed == ("prefill",)


def test_the_autoscaler_never_scales_an_external_role():
    import asyncio

    from baton.operator.autoscaler import AutoscalerState, tick
    from baton.operator.prometheus import PrometheusClient

    from tests.operator.test_autoscaler import NAME as A_NAME
    from tests.operator.test_autoscaler import NS as A_NS
    from tests.operator.test_autoscaler import URL as A_URL
    from tests.operator.test_autoscaler import FakeKube as AutoscalerKube
    from tests.operator.test_autoscaler import llmservice, prometheus

    svc = llmservice()
    svc["spec"]["decode"]["autoscaling"]["mode"] = "external"
    kube = AutoscalerKube(svc, {"prefill": 1, "decode": 1})
    # a pending scale of decode recorded by an earlier operator (decode was Baton's then): not completed now
    kube.llms["status"]["autoscaler"] = {"pending": {"decode": {"from": 1, "to": 3, "reason": "TPOTAboveSLO",
                                                                "at": 999.0}}}
    state = AutoscalerState(client=PrometheusClient(A_URL, transport=prometheus(ttft_p90=1.2, tpot_p90=0.2), retries=0))
    result = asyncio.run(tick(kube, asyncio.Lock(), A_NS, A_NAME, state, lambda *e: None, now_s=1000.0))
    assert set(result.decisions) == {"prefill"} and result.scaled == {"prefill": (1, 3)}
    assert [m["metadata"]["name"] for m, _ in kube.applied] == [f"{A_NAME}-prefill"]
    assert kube.deployments[f"{A_NAME}-decode"]["spec"]["replicas"] == 1
    assert "desiredReplicas" not in kube.llms["status"].get("decode", {})

    svc["spec"]["prefill"]["autoscaling"]["mode"] = "external"  # no role left for Baton: nothing to do
    kube = AutoscalerKube(svc, {"prefill": 1, "decode": 1})
    assert asyncio.run(tick(kube, asyncio.Lock(), A_NS, A_NAME, state, lambda *e: None, now_s=1000.0)) is None


@pytest.mark.parametrize(("spec", "runs"), [
    ({"autoscaling": {"enabled": True}}, True),
    ({"autoscaling": {"mode": "baton"}}, True),
    ({"autoscaling": {"mode": "external"}, "prefill": {"autoscaling": {"mode": "baton"}}}, True),
    ({"autoscaling": {"mode": "external"}}, False),
    ({"autoscaling": {"enabled": True}, "prefill": {"autoscaling": {"mode": "external"}},
      "decode": {"autoscaling": {"mode": "off"}}}, False),
    ({}, False),
])
def test_the_autoscaler_loop_runs_while_a_role_is_in_mode_baton(spec, runs):
    from baton.operator.handlers import wanted_loops  # what starts and stops the loop (service_loops)

    assert ("autoscaler" in wanted_loops(spec)) is runs


def test_a_manual_scale_in_baton_mode_is_only_the_autoscalers_new_starting_point():
    """What README says about `kubectl scale` of a role in mode baton: the reconciler keeps it (above), and the
    autoscaler's next tick decides from it -- up at once if the signals ask for more, down only once the pods are
    ready and then one pod per tick, never a floor."""
    from baton.operator.autoscale_policy import Recommendation

    config = PolicyConfig(managed=("decode",), scale_down_stabilization_s=300, interval_s=15)
    now = 10_000.0
    # an autoscaler that has run for a while and recommended 2 decode replicas all along
    settled_history = History(decode=RoleHistory(
        started_s=0.0, recommendations=tuple(Recommendation(now - t, 2) for t in (300, 200, 100, 15))))

    def decode_after_manual_scale(replicas: int, ready: int, tpot: float, kv: float) -> int:
        obs = Observations(prefill=RoleObservation(current_replicas=1, ready_replicas=1),
                           decode=RoleObservation(tpot_p90_s=tpot, kv_cache_usage=kv, num_running=2,
                                                  current_replicas=replicas, ready_replicas=ready),
                           window_s=60, now_s=now)
        return decide(obs, config, settled_history)[0]["decode"].desired

    idle = {"tpot": 0.01, "kv": 0.05}  # far below the TPOT SLO (50 ms), little KV in use
    assert decode_after_manual_scale(5, 5, **idle) == 4  # scaled up by hand, ready: back down, one pod per tick
    assert decode_after_manual_scale(5, 3, **idle) == 5  # pods of the manual scale still starting: held
    assert decode_after_manual_scale(1, 1, tpot=0.15, kv=0.3) > 1  # scaled down by hand below need: up at once
