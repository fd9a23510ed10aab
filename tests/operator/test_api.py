"""LLMService models: defaults, aliases, validation messages, status helpers."""
from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from baton.operator.api import (
    API_VERSION,
    MAX_NAME_LENGTH,
    Condition,
    InvalidLLMService,
    LLMService,
    LLMServiceSpec,
    ModelSource,
    RoleSpec,
    dump_llmservice,
    format_path,
    get_condition,
    parse_llmservice,
    set_condition,
    validation_errors,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL = {
    "apiVersion": "baton.dev/v1alpha1",
    "kind": "LLMService",
    "metadata": {"name": "llama", "namespace": "ml"},
    "spec": {"model": {"name": "llama-3.1-8b", "source": {"pvc": {"claimName": "models", "path": "llama"}}}},
}


def body(**spec_changes: object) -> dict:
    b = copy.deepcopy(MINIMAL)
    b["spec"].update(spec_changes)
    return b


def test_defaults() -> None:
    svc = parse_llmservice(MINIMAL)
    s = svc.spec
    assert (svc.name, svc.namespace) == ("llama", "ml")
    assert s.engine.kind == "baton" and s.engine.image is None  # the operator's worker image (render)
    assert s.slo.ttft.seconds == 0.5 and s.slo.tpot.seconds == 0.05 and s.slo.attainment == 0.9
    assert s.prefill.replicas == 1 and s.prefill.tensor_parallel == 1 and s.prefill.port == 8000
    assert s.prefill.autoscaling.min_replicas == 1 and s.prefill.autoscaling.max_replicas == 8
    assert s.router.replicas == 2 and s.router.policy == "least-loaded" and s.router.port == 8080
    assert (s.kv_transfer.transport, s.kv_transfer.locality, s.kv_transfer.port) == ("auto", "any", 14579)
    a = s.autoscaling
    assert not a.enabled and a.prometheus_url is None
    assert (a.interval.seconds, a.scale_up_stabilization.seconds, a.scale_down_stabilization.seconds) == (15, 0, 300)
    assert s.model.source.kind == "pvc"
    assert svc.status.conditions == []


def test_dump_uses_camel_case_and_keeps_user_strings() -> None:
    b = body(slo={"ttft": "1.5s"}, autoscaling={"enabled": True, "prometheusURL": "http://prom:9090"},
             decode={"resources": {"limits": {"memory": "8Gi", "cpu": 2}}})
    out = dump_llmservice(parse_llmservice(b))
    assert out["spec"]["slo"]["ttft"] == "1.5s"
    assert out["spec"]["autoscaling"]["prometheusURL"] == "http://prom:9090"
    assert out["spec"]["kvTransfer"]["port"] == 14579
    assert out["spec"]["prefill"]["tensorParallel"] == 1
    assert out["spec"]["decode"]["resources"]["limits"] == {"memory": "8Gi", "cpu": "2"}
    assert "status" in out
    # What we write back parses to the same object.
    assert parse_llmservice(out) == parse_llmservice(b)


def test_snake_case_construction_in_python() -> None:
    role = RoleSpec(tensor_parallel=4, node_selector={"baton.dev/pool": "prefill"})
    assert role.tensor_parallel == 4
    spec = LLMServiceSpec(model={"name": "m", "source": ModelSource(host_path={"path": "/m"})}, prefill=role,
                          engine={"kind": "vllm"})
    assert spec.model.source.kind == "hostPath"
    svc = LLMService(metadata={"name": "x"}, spec=spec)
    assert svc.api_version == API_VERSION and svc.kind == "LLMService"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    svc = parse_llmservice(yaml.safe_load(path.read_text()))
    assert svc.spec.prefill.node_selector == {"baton.dev/pool": "prefill"}
    assert svc.spec.decode.node_selector == {"baton.dev/pool": "decode"}


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"llama-disagg.yaml", "tiny-local.yaml"} <= names
    llama = parse_llmservice(yaml.safe_load((EXAMPLES / "llama-disagg.yaml").read_text()))
    assert llama.spec.engine.kind == "vllm" and llama.spec.autoscaling.enabled
    assert (llama.spec.prefill.tensor_parallel, llama.spec.decode.tensor_parallel) == (2, 1)
    tiny = parse_llmservice(yaml.safe_load((EXAMPLES / "tiny-local.yaml").read_text()))
    assert tiny.spec.engine.kind == "baton" and not tiny.spec.autoscaling.enabled


def test_parse_raises_with_all_problems() -> None:
    b = body(prefill={"replicas": -1, "tensorParallel": 3}, engine={"kind": "tgi"})
    with pytest.raises(InvalidLLMService) as info:
        parse_llmservice(b)
    problems = info.value.problems
    assert "spec.prefill.replicas: must be >= 0, got -1" in problems
    assert "spec.prefill.tensorParallel: must be a power of two (1, 2, 4, ...), got 3" in problems
    assert "spec.engine.kind: must be one of 'vllm' or 'baton', got 'tgi'" in problems
    assert isinstance(info.value, ValueError)


def test_the_router_port_cannot_be_its_metrics_port() -> None:
    """The router pod listens for /metrics on a port of its own (launch.DEFAULT_METRICS_PORT)."""
    with pytest.raises(InvalidLLMService) as info:
        parse_llmservice(body(router={"port": 9400}))
    assert info.value.problems == [
        "spec.router.port: 9400 is the router pod's metrics port (/metrics listens there): choose another"]
    assert parse_llmservice(body(router={"port": 9401})).spec.router.port == 9401


def test_a_baton_workers_ports_cannot_be_its_metrics_port() -> None:
    """A Baton worker pod serves /metrics for Prometheus on launch.DEFAULT_METRICS_PORT; vLLM has no such
    listener, so its workers may use that number."""
    problems = validation_errors(body(engine={"kind": "baton"}, decode={"port": 9400}, kvTransfer={"port": 9400}))
    taken = "9400 is a Baton worker pod's metrics port (/metrics listens there): choose another"
    assert f"spec.decode.port: {taken}" in problems and f"spec.kvTransfer.port: {taken}" in problems
    assert validation_errors(body(engine={"kind": "vllm"}, decode={"port": 9400})) == []


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32, 64])
def test_powers_of_two_accepted(tp: int) -> None:
    assert validation_errors(body(engine={"kind": "vllm"}, prefill={"tensorParallel": tp})) == []


@pytest.mark.parametrize(("tp", "fragment"), [(0, "must be >= 1"), (128, "must be <= 64"), (6, "power of two"),
                                              ("two", "must be an integer")])
def test_tensor_parallel_refused(tp: object, fragment: str) -> None:
    (problem,) = validation_errors(body(engine={"kind": "vllm"}, decode={"tensorParallel": tp}))
    assert problem.startswith("spec.decode.tensorParallel: ") and fragment in problem


def test_unknown_field_lists_allowed_names_without_close_match() -> None:
    (problem,) = validation_errors(body(router={"zzz": 1}))
    assert problem.startswith("spec.router.zzz: unknown field (allowed: image, replicas, policy, port")


def test_unknown_top_level_spec_field_suggests() -> None:
    (problem,) = validation_errors(body(kvtransfer={}))
    assert problem == "spec.kvtransfer: unknown field; did you mean 'kvTransfer'?"


def test_snake_case_is_accepted_in_yaml_too() -> None:
    # populate_by_name: Python names work in bodies as well; harmless, and helps tests build dicts.
    assert validation_errors(body(kv_transfer={"port": 15000})) == []


def test_missing_spec_and_metadata() -> None:
    assert validation_errors({"apiVersion": API_VERSION, "kind": "LLMService"}) == [
        "metadata: is required", "spec: is required"]
    assert validation_errors({**MINIMAL, "metadata": {}}) == ["metadata.name: is required"]


def test_wrong_kind_and_version() -> None:
    problems = validation_errors({**MINIMAL, "apiVersion": "baton.dev/v1", "kind": "Pod"})
    assert problems == ["apiVersion: must be 'baton.dev/v1alpha1', got 'baton.dev/v1'",
                        "kind: must be 'LLMService', got 'Pod'"]


def test_generate_name_counts_the_random_suffix() -> None:
    b = copy.deepcopy(MINIMAL)
    b["metadata"] = {"generateName": "x" * (MAX_NAME_LENGTH - 5)}
    assert validation_errors(b) == []
    b["metadata"] = {"generateName": "x" * (MAX_NAME_LENGTH - 4)}
    (problem,) = validation_errors(b)
    assert problem.startswith("metadata.generateName: must be at most 55 characters (including the 5")


def test_name_limit_matches_naming_module() -> None:
    naming = pytest.importorskip("baton.operator.naming")
    assert MAX_NAME_LENGTH == naming.READABLE_NAME_MAX


@pytest.mark.parametrize("garbage", [
    None, [], "spec", 3, {"spec": None}, {"spec": []}, {"metadata": "x", "spec": {}},
    {**MINIMAL, "spec": {"model": {"name": 3, "source": "pvc"}}},
    {**MINIMAL, "spec": {"model": {"name": "m", "source": {"pvc": None}}, "prefill": {"tolerations": "x"}}},
    {**MINIMAL, "spec": {"model": {"name": "m", "source": {"uri": "hf://x"}}, "decode": {"resources": {"limits": 1}}}},
])
def test_garbage_gives_messages_not_tracebacks(garbage: object) -> None:
    problems = validation_errors(garbage)
    assert problems and all(isinstance(p, str) and ": " in p for p in problems)


def test_format_path() -> None:
    assert format_path(["spec", "prefill", "tolerations", 0, "key"]) == "spec.prefill.tolerations[0].key"
    assert format_path(["spec", "limits", "nvidia.com/gpu"]) == "spec.limits[nvidia.com/gpu]"
    assert format_path([]) == "body"


def test_status_is_lenient() -> None:
    b = copy.deepcopy(MINIMAL)
    b["status"] = {"phase": "Ready", "futureField": 1, "prefill": {"readyReplicas": 2, "desiredReplicas": 3}}
    svc = parse_llmservice(b)
    assert svc.status.phase == "Ready" and svc.status.prefill.ready == "2/3"
    b["status"] = {"phase": "Exploded"}
    assert parse_llmservice(b).status.phase is None  # a broken status never blocks reconcile


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
LATER = datetime(2024, 5, 1, 12, 5, 0, tzinfo=UTC)


def test_set_condition_adds_and_keeps_time_when_status_unchanged() -> None:
    conds = set_condition([], "Ready", "False", "Starting", "pods starting", NOW, observed_generation=1)
    assert conds == [Condition(type="Ready", status="False", reason="Starting", message="pods starting",
                               last_transition_time=NOW, observed_generation=1)]
    again = set_condition(conds, "Ready", False, "StillStarting", "2/3 ready", LATER, observed_generation=2)
    assert again[0].last_transition_time == NOW  # same status: time stays
    assert again[0].reason == "StillStarting" and again[0].observed_generation == 2
    flipped = set_condition(again, "Ready", True, "AllReady", "ok", LATER)
    assert flipped[0].last_transition_time == LATER and flipped[0].status == "True"
    assert flipped[0].observed_generation == 2  # kept when not given
    assert conds[0].reason == "Starting"  # input untouched (pure)


def test_set_condition_keeps_order_and_accepts_dicts_and_strings() -> None:
    raw = [{"type": "PrefillReady", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"},
           {"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]
    out = set_condition(raw, "PrefillReady", True, "Ok", "fine", "2024-05-01T12:00:00Z")
    assert [c.type for c in out] == ["PrefillReady", "Ready"]
    assert out[0].last_transition_time == datetime(2024, 1, 1, tzinfo=UTC)
    out = set_condition(out, "SLOMet", "Unknown", "NoData", "no traffic yet", NOW)
    assert [c.type for c in out] == ["PrefillReady", "Ready", "SLOMet"]
    assert get_condition(out, "SLOMet").status == "Unknown"
    assert get_condition(out, "Nope") is None


def test_condition_times_serialize_like_kubernetes() -> None:
    (c,) = set_condition([], "Ready", True, "Ok", "fine", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC))
    assert c.model_dump(mode="json", by_alias=True)["lastTransitionTime"] == "2024-05-01T12:00:00Z"
