"""Unit tests of the pure status rules (no cluster)."""
from baton.operator.status import compute_status, role_readiness, set_condition

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def deployment(name: str, replicas: int = 1, ready: int = 1, updated: int | None = None, generation: int = 1,
               observed: int = 1) -> dict:
    return {"metadata": {"name": name, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated}}


def llms(status: dict | None = None, generation: int = 3) -> dict:
    return {"metadata": {"name": "demo", "namespace": "ml", "generation": generation}, "spec": {},
            "status": status or {}}


def all_ready() -> dict:
    return {"prefill": deployment("demo-prefill", 2, 2), "decode": deployment("demo-decode", 1, 1),
            "router": deployment("demo-router", 2, 2)}


def test_role_readiness_rules():
    assert role_readiness("prefill", None).reason == "NotCreated"
    assert role_readiness("prefill", deployment("p", generation=2, observed=1)).reason == "RolloutPending"
    assert role_readiness("prefill", deployment("p", 2, 2, updated=1)).reason == "RollingOut"
    r = role_readiness("prefill", deployment("p", 3, 1))
    assert (r.ready, r.reason, r.message) == (False, "PodsNotReady", "Deployment p: 1/3 pods ready")
    assert role_readiness("prefill", deployment("p", 0, 0)).ready
    assert role_readiness("prefill", deployment("p", 2, 2)).ready


def test_set_condition_moves_transition_time_only_on_flip():
    conds = set_condition([], "Ready", False, "X", "m", NOW)
    conds = set_condition(conds, "Ready", False, "Y", "m2", LATER)
    assert conds == [{"type": "Ready", "status": "False", "reason": "Y", "message": "m2", "lastTransitionTime": NOW}]
    conds = set_condition(conds, "Ready", True, "Z", "ok", LATER)
    assert conds[0]["lastTransitionTime"] == LATER and conds[0]["status"] == "True"


def test_ready_status_counts_and_conditions():
    status = compute_status(llms(), all_ready(), NOW)
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == 3
    assert status["endpoint"] == "http://demo.ml.svc:80"
    assert status["prefill"] == {"replicas": 2, "readyReplicas": 2, "desiredReplicas": 2, "ready": "2/2"}
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types == {"PrefillReady": "True", "DecodeReady": "True", "RouterReady": "True", "Ready": "True"}


def test_missing_child_is_pending_and_names_the_role():
    deps = all_ready() | {"decode": None}
    status = compute_status(llms(), deps, NOW)
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "DecodeNotReady"
    assert "decode Deployment does not exist" in ready["message"]


def test_degraded_after_ready_with_same_generation_but_progressing_after_spec_change():
    ready = compute_status(llms(), all_ready(), NOW)
    broken = all_ready() | {"prefill": deployment("demo-prefill", 2, 1)}
    assert compute_status(llms(ready), broken, LATER)["phase"] == "Degraded"
    assert compute_status(llms(ready, generation=4), broken, LATER)["phase"] == "Progressing"
    # A child rolling out (e.g. the reconciler just undid a hand edit) is progress, not degradation.
    rolling = all_ready() | {"decode": deployment("demo-decode", 1, 1, generation=2, observed=1)}
    assert compute_status(llms(ready), rolling, LATER)["phase"] == "Progressing"


def test_apply_error_fails_and_keeps_foreign_conditions():
    previous = {"conditions": [{"type": "SLOMet", "status": "True", "reason": "WithinSLO", "message": "",
                                "lastTransitionTime": NOW}]}
    status = compute_status(llms(previous), all_ready(), LATER, apply_error="applying children failed: forbidden")
    assert status["phase"] == "Failed"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["SLOMet"]["status"] == "True"
    assert by_type["Ready"]["reason"] == "ApplyFailed" and "forbidden" in by_type["Ready"]["message"]


def test_is_subset_ignores_server_defaults_but_sees_drift():
    from baton.operator.reconcile import is_subset

    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "w", "image": "a"}]}}}}
    live = {"spec": {"replicas": 2, "strategy": {}, "template": {"spec": {"containers": [
        {"name": "w", "image": "a", "imagePullPolicy": "IfNotPresent"}]}}}, "status": {}}
    assert is_subset(desired, live)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil"
    assert not is_subset(desired, live)
    assert not is_subset({"ports": [1, 2]}, {"ports": [1]})
    assert not is_subset({"a": 1}, {})
    assert is_subset({"spec": {"publishNotReadyAddresses": False, "x": []}}, {"spec": {}})  # omitted defaults


def _pod(name: str, init: dict | None) -> dict:
    statuses = [] if init is None else [{"name": "fetch-model", **init}]
    return {"metadata": {"name": name}, "status": {"initContainerStatuses": statuses}}


def test_model_fetch_state_from_init_containers():
    from baton.operator.model_fetch_status import model_fetch_state

    assert model_fetch_state([]).ok is None
    assert model_fetch_state([_pod("p", {"state": {"running": {}}})]).ok is None
    done = _pod("a", {"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}})
    assert model_fetch_state([done]).ok is True
    # crash-looping: the last failure is in lastState, its one-line message from the termination log
    failing = _pod("b", {"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                         "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message":
                                       "https://m.example/x/config.json not found (HTTP 404)\n"}}})
    state = model_fetch_state([done, failing])  # a failure anywhere wins: it will repeat
    assert (state.ok, state.reason) == (False, "ModelFetchFailed")
    assert state.message == "pod b: https://m.example/x/config.json not found (HTTP 404)"
    silent = _pod("c", {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}})
    assert "exit code 137, OOMKilled" in model_fetch_state([silent]).message


def test_failed_model_download_fails_the_service_with_its_message():
    from baton.operator.model_fetch_status import ModelFetch

    bad = ModelFetch(False, "ModelFetchFailed", "pod b: refused the credentials (HTTP 401)")
    status = compute_status(llms(), all_ready(), "2026-01-01T00:00:00Z", model=bad)
    assert status["phase"] == "Failed"
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["ModelReady"]["status"] == "False" and "HTTP 401" in conds["ModelReady"]["message"]
    assert conds["Ready"]["reason"] == "ModelFetchFailed"
    ok = compute_status(llms(), all_ready(), "2026-01-01T00:00:00Z", model=ModelFetch(True, "ModelFetched", "ok"))
    assert ok["phase"] == "Ready"
    assert {c["type"]: c for c in ok["conditions"]}["ModelReady"]["status"] == "True"
    plain = compute_status(llms(), all_ready(), "2026-01-01T00:00:00Z")
    assert "ModelReady" not in {c["type"] for c in plain["conditions"]}  # no uri source, no condition
