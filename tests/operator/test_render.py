"""Tests of `render`: golden files for whole LLMServices, plus targeted rules.

Goldens live in tests/operator/golden/: one YAML stream per input, for the repository's examples
(`example-<stem>.yaml`, from examples/*.yaml) and for the fixtures in golden/inputs/ (`<stem>.yaml`).
After an intended change, regenerate them and review the diff:

    BATON_UPDATE_GOLDEN=1 pytest tests/operator/test_render.py
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path

import pytest
import yaml
from baton.operator import labels as L
from baton.operator.api import InvalidLLMService
from baton.operator.naming import (
    DNS_LABEL_MAX,
    READABLE_NAME_MAX,
    child_name,
    is_dns_label,
    label_value,
)
from baton.operator.render import GPU_RESOURCE, child_keys, render

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
INPUTS = GOLDEN / "inputs"
EXAMPLES = ROOT / "examples"
UPDATE = os.environ.get("BATON_UPDATE_GOLDEN", "") not in ("", "0", "false")


# --------------------------------------------------------------------------------------------- helpers
class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Multi-line strings as literal blocks, so diffs are line by line.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


def llmservices_in(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMService"]


def as_from_apiserver(body: dict, index: int = 0) -> dict:
    """An example manifest as the apiserver would return it: namespace, uid, generation filled in."""
    body = copy.deepcopy(body)
    meta = body.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    meta.setdefault("uid", f"00000000-0000-4000-8000-{index:012d}")
    meta.setdefault("generation", 1)
    return body


def golden_cases() -> list[tuple[str, Path, bool]]:
    """(golden file name, input path, input-is-an-example)."""
    cases = [(f"{p.stem}.yaml", p, False) for p in sorted(INPUTS.glob("*.yaml"))]
    cases += [(f"example-{p.stem}.yaml", p, True) for p in sorted(EXAMPLES.glob("*.yaml"))
              if llmservices_in(p)]
    return cases


def render_input(path: Path, is_example: bool) -> list[dict]:
    out: list[dict] = []
    for i, body in enumerate(llmservices_in(path)):
        out += render(as_from_apiserver(body, i) if is_example else body)
    return out


def base(**spec_overrides) -> dict:
    body = {
        "apiVersion": "baton.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "svc", "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": {
            "model": {"name": "m", "source": {"pvc": {"claimName": "models", "path": "m"}}},
            "engine": {"kind": "baton"},
        },
    }
    body["spec"].update(copy.deepcopy(spec_overrides))
    return body


def by_key(manifests: list[dict]) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def deployment(manifests: list[dict], role: str, name: str = "svc") -> dict:
    return by_key(manifests)[("Deployment", f"{name}-{role}")]


def pod(manifests: list[dict], role: str, name: str = "svc") -> dict:
    return deployment(manifests, role, name)["spec"]["template"]["spec"]




# ---------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("golden,source,is_example", golden_cases(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_golden(golden: str, source: Path, is_example: bool) -> None:
    actual = dump(render_input(source, is_example))
    path = GOLDEN / golden
    if UPDATE:
        path.write_text(actual)
        return
    assert path.exists(), f"no golden file {path}; create it with BATON_UPDATE_GOLDEN=1"
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"golden/{golden}", tofile=f"render({source.relative_to(ROOT)})"))
        pytest.fail(f"render output differs from golden/{golden} "
                    f"(if intended: BATON_UPDATE_GOLDEN=1 pytest {Path(__file__).relative_to(ROOT)}):\n{diff}",
                    pytrace=False)


def test_no_stale_goldens() -> None:
    wanted = {g for g, _, _ in golden_cases()}
    stale = sorted(p.name for p in GOLDEN.glob("*.yaml") if p.name not in wanted)
    assert not stale, f"golden files without an input (delete them): {stale}"


def test_golden_dump_round_trips() -> None:
    """The golden YAML loads back to exactly what render returned (no type or string mangling)."""
    for _, source, is_example in golden_cases():
        manifests = render_input(source, is_example)
        assert list(yaml.safe_load_all(dump(manifests))) == manifests


# -------------------------------------------------------------------------------------- shape and order
def test_children_order_names_and_child_keys() -> None:
    body = base()
    manifests = render(body)
    keys = [(m["apiVersion"], m["kind"], m["metadata"]["name"]) for m in manifests]
    assert keys == [
        ("v1", "ServiceAccount", "svc"),
        ("rbac.authorization.k8s.io/v1", "Role", "svc-router"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", "svc-router"),
        ("v1", "Service", "svc-prefill"),
        ("v1", "Service", "svc-decode"),
        ("v1", "Service", "svc"),
        ("networking.k8s.io/v1", "NetworkPolicy", "svc-prefill"),
        ("networking.k8s.io/v1", "NetworkPolicy", "svc-decode"),
        ("networking.k8s.io/v1", "NetworkPolicy", "svc-router"),
        ("apps/v1", "Deployment", "svc-prefill"),
        ("apps/v1", "Deployment", "svc-decode"),
        ("apps/v1", "Deployment", "svc-router"),
    ]
    assert child_keys(body) == keys


def test_child_keys_needs_only_the_name() -> None:
    assert ("v1", "Service", "x-prefill") in child_keys({"metadata": {"name": "x"}, "spec": {"nonsense": True}})
    with pytest.raises(ValueError):
        child_keys({"metadata": {}})


def test_deterministic_and_input_untouched() -> None:
    body = base(prefill={"tolerations": [{"key": "a", "operator": "Exists"}]}, kvTransfer={"locality": "zone"})
    snapshot = copy.deepcopy(body)
    first, second = render(body), render(copy.deepcopy(body))
    assert first == second
    assert json.dumps(first) == json.dumps(second)  # same key order too
    assert body == snapshot
    # Shuffled key order in the input changes nothing.
    shuffled = json.loads(json.dumps(body, sort_keys=True))
    assert json.dumps(render(shuffled)) == json.dumps(first)


def test_manifests_share_no_mutable_parts() -> None:
    manifests = render(base())
    prefill, decode = (m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] != "svc-router")
    prefill["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = 99
    prefill["spec"]["selector"]["matchLabels"]["x"] = "y"
    again = [m for m in render(base()) if m["kind"] == "Deployment"]
    assert again[1]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1
    assert "x" not in again[1]["spec"]["selector"]["matchLabels"]
    assert decode["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1


def test_invalid_spec_names_the_field() -> None:
    body = base(prefill={"tensorParallel": 3})
    with pytest.raises(InvalidLLMService) as info:
        render(body)
    assert "spec.prefill.tensorParallel" in str(info.value)


# --------------------------------------------------------------------------------------- metadata, labels
def test_namespace_and_owner_reference_on_every_object() -> None:
    for m in render(base()):
        meta = m["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["ownerReferences"] == [{
            "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService", "name": "svc", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True,
        }]


def test_no_owner_reference_without_uid() -> None:
    body = base()
    del body["metadata"]["uid"]
    assert all("ownerReferences" not in m["metadata"] for m in render(body))


def test_labels_on_everything() -> None:
    common = {
        "app.kubernetes.io/name": "baton",
        "app.kubernetes.io/instance": "svc",
        "app.kubernetes.io/managed-by": "baton-operator",
        "app.kubernetes.io/part-of": "baton",
        "baton.dev/llmservice": "svc",
    }
    for m in render(base()):
        labels = m["metadata"]["labels"]
        assert common.items() <= labels.items(), m["metadata"]["name"]
        assert labels["app.kubernetes.io/component"] in ("prefill", "decode", "router", "config")
        if m["kind"] in ("Service", "Deployment"):
            assert labels["baton.dev/role"] == labels["app.kubernetes.io/component"]
        if m["kind"] == "Deployment":
            tmpl = m["spec"]["template"]["metadata"]["labels"]
            assert tmpl == labels
            sel = m["spec"]["selector"]["matchLabels"]
            assert sel == {"app.kubernetes.io/instance": "svc", "baton.dev/role": labels["baton.dev/role"]}
            assert sel.items() <= tmpl.items()


def test_selectors_stable_across_spec_changes() -> None:
    """Deployment selectors are immutable: nothing in the spec may change them."""
    a = render(base())
    b = render(base(engine={"kind": "vllm", "image": "v:1"}, prefill={"replicas": 5, "tensorParallel": 4},
                    kvTransfer={"locality": "node"}, router={"policy": "round-robin"}))
    for role in ("prefill", "decode", "router"):
        assert deployment(a, role)["spec"]["selector"] == deployment(b, role)["spec"]["selector"]
    assert by_key(a)[("Service", "svc")]["spec"]["selector"] == by_key(b)[("Service", "svc")]["spec"]["selector"]


def test_services() -> None:
    m = by_key(render(base(kvTransfer={"port": 15000})))
    for role in ("prefill", "decode"):
        spec = m[("Service", f"svc-{role}")]["spec"]
        assert spec["clusterIP"] == "None"
        assert not spec.get("publishNotReadyAddresses")  # only ready workers are discovered
        assert [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] == [
            ("http", 8000, "http"), ("kv", 15000, "kv")]
        assert spec["selector"] == {"app.kubernetes.io/instance": "svc", "baton.dev/role": role}
    router = m[("Service", "svc")]["spec"]
    assert router["type"] == "ClusterIP"
    assert router["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert router["selector"] == {"app.kubernetes.io/instance": "svc", "baton.dev/role": "router"}


# ------------------------------------------------------------------------------------------- replicas
def test_replicas_set_without_autoscaling() -> None:
    m = render(base(prefill={"replicas": 3}, decode={"replicas": 0}, router={"replicas": 4}))
    assert deployment(m, "prefill")["spec"]["replicas"] == 3
    assert deployment(m, "decode")["spec"]["replicas"] == 0
    assert deployment(m, "router")["spec"]["replicas"] == 4


def test_autoscaling_on_omits_replicas_of_worker_roles() -> None:
    m = render(base(prefill={"replicas": 2}, decode={"replicas": 3},
                    autoscaling={"enabled": True, "prometheusURL": "http://prom:9090"}))
    assert "replicas" not in deployment(m, "prefill")["spec"]
    assert "replicas" not in deployment(m, "decode")["spec"]
    assert deployment(m, "router")["spec"]["replicas"] == 2  # the router is not autoscaled


def test_replicas_change_rolls_nothing() -> None:
    a, b = render(base()), render(base(prefill={"replicas": 7}))
    for role in ("prefill", "decode", "router"):
        assert deployment(a, role)["spec"]["template"] == deployment(b, role)["spec"]["template"]


# ------------------------------------------------------------------------------------------- locality
def test_locality_any_adds_no_affinity() -> None:
    m = render(base(kvTransfer={"locality": "any"}))
    assert "affinity" not in pod(m, "prefill") and "affinity" not in pod(m, "decode")


@pytest.mark.parametrize("locality,key", [("zone", "topology.kubernetes.io/zone"),
                                          ("node", "kubernetes.io/hostname")])
def test_locality_affinity(locality: str, key: str) -> None:
    m = render(base(kvTransfer={"locality": locality}))
    decode = pod(m, "decode")["affinity"]["podAffinity"]
    assert decode == {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "svc", "baton.dev/role": "prefill"}},
        "topologyKey": key,
    }]}
    prefill = pod(m, "prefill")["affinity"]["podAffinity"]
    assert prefill == {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "svc", "baton.dev/role": "decode"}},
            "topologyKey": key,
        },
    }]}
    assert "affinity" not in pod(m, "router")


def test_user_affinity_is_merged_not_replaced() -> None:
    user_term = {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}
    node = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["decode"]}]}]}}
    body = base(decode={"affinity": {"nodeAffinity": node,
                                     "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [user_term]},
                                     "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                                         {"weight": 1, "podAffinityTerm": user_term}]}}},
                kvTransfer={"locality": "zone"})
    snapshot = copy.deepcopy(body)
    aff = pod(render(body), "decode")["affinity"]
    assert aff["nodeAffinity"] == node
    assert aff["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 1
    terms = aff["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0] == user_term
    assert terms[1]["topologyKey"] == "topology.kubernetes.io/zone"
    assert body == snapshot


# ------------------------------------------------------------------------------------ GPUs, scheduling
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_count_is_tensor_parallel(tp: int) -> None:
    m = render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}, prefill={"tensorParallel": tp}))
    res = pod(m, "prefill")["containers"][0]["resources"]
    assert res["limits"][GPU_RESOURCE] == str(tp)
    assert res["requests"][GPU_RESOURCE] == str(tp)
    assert pod(m, "decode")["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "1"
    assert GPU_RESOURCE not in json.dumps(pod(m, "router"))


def test_user_resources_kept_and_larger_gpu_limit_honoured() -> None:
    m = render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}, decode={"tensorParallel": 2,
                            "resources": {"requests": {"cpu": 4, "memory": "32Gi"},
                                          "limits": {"memory": "64Gi", GPU_RESOURCE: 4}}}))
    res = pod(m, "decode")["containers"][0]["resources"]
    assert res == {"limits": {"memory": "64Gi", GPU_RESOURCE: "4"},
                   "requests": {"cpu": "4", "memory": "32Gi", GPU_RESOURCE: "4"}}


def test_cpu_service_requests_no_gpu_and_sizes_threads_from_its_limit() -> None:
    m = render(base(prefill={"resources": {"limits": {"cpu": "3"}}}, decode={"resources": {"requests": {"cpu": 1.5}}}))
    for role, limit in (("prefill", "3"), ("decode", "2")):  # decode: no limit -> its request rounded up
        c = pod(m, role)["containers"][0]
        assert GPU_RESOURCE not in json.dumps(c["resources"]), role
        assert c["resources"]["limits"]["cpu"] == limit
        env = {e["name"]: e for e in c["env"]}
        assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"] == {
            "containerName": "worker", "resource": "limits.cpu", "divisor": "1"}
    gpu = render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}))
    c = pod(gpu, "prefill")["containers"][0]
    assert c["resources"]["limits"][GPU_RESOURCE] == "1"
    assert "OMP_NUM_THREADS" not in {e["name"] for e in c["env"]}


def test_dev_shm_for_every_vllm_worker_and_baton_tensor_parallel() -> None:
    """vLLM needs more than the runtime's 64 MiB /dev/shm at any TP (its engine core's broadcast queue: 160 MiB),
    NCCL between TP ranks too; a TP 1 Baton worker needs none."""
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    m = render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}, prefill={"tensorParallel": 2}))
    for role in ("prefill", "decode"):  # TP 2 and TP 1
        assert shm in pod(m, role)["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod(m, role)["containers"][0]["volumeMounts"]
    baton = render(base(engine={"kind": "baton"}, accelerator="cpu"))
    assert shm not in pod(baton, "decode")["volumes"]


def test_tolerations_and_node_selector_passthrough() -> None:
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
           {"key": "dedicated", "value": "llm", "effect": "NoExecute", "tolerationSeconds": 30}]
    m = render(base(prefill={"tolerations": tol, "nodeSelector": {"gpu": "h100", "a": "b"}}))
    assert pod(m, "prefill")["tolerations"] == tol
    assert pod(m, "prefill")["nodeSelector"] == {"a": "b", "gpu": "h100"}
    assert "tolerations" not in pod(m, "decode") and "nodeSelector" not in pod(m, "decode")


# ------------------------------------------------------------------------------------------- volumes
def test_pvc_volume() -> None:
    p = pod(render(base()), "prefill")
    assert p["volumes"][0] == {"name": "model",
                               "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in p["containers"][0]["volumeMounts"]
    assert p["containers"][0]["args"][:4] == ["--role", "prefill", "--model", "/models/m"]
    assert "initContainers" not in p


def test_host_path_volume() -> None:
    p = pod(render(base(model={"name": "m", "source": {"hostPath": {"path": "/data/m"}}})), "decode")
    assert p["volumes"][0] == {"name": "model", "hostPath": {"path": "/data/m", "type": "Directory"}}
    assert p["containers"][0]["args"][:4] == ["--role", "decode", "--model", "/models"]
    assert "initContainers" not in p


def test_uri_volume_and_fetch_init_container() -> None:
    """`cache: {mode: none}`: the download per pod into its emptyDir (the node cache: test_model_cache.py)."""
    p = pod(render(base(model={"name": "m", "source": {"uri": "https://models.example/m.tar.gz",
                                                       "secretRef": {"name": "creds"}},
                               "cache": {"mode": "none"}})),
            "prefill")
    assert p["volumes"][0] == {"name": "model", "emptyDir": {}}
    (init,) = p["initContainers"]
    assert init["args"] == ["--uri", "https://models.example/m.tar.gz", "--dest", "/models"]
    assert init["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    no_secret = pod(render(base(model={"name": "m", "source": {"uri": "hf://org/m"}, "cache": {"mode": "none"}})),
                    "prefill")
    assert "envFrom" not in no_secret["initContainers"][0]


# ------------------------------------------------------------------------------------------- commands
def test_baton_worker_command() -> None:
    from baton.cli import build_parser

    c = pod(render(base(engine={"kind": "baton", "args": ["--max-num-seqs", "8"]},
                        decode={"extraArgs": ["--kv-blocks", "64"]}, kvTransfer={"port": 15000})),
            "decode")["containers"][0]
    assert c["name"] == "worker"
    assert c["command"] == ["baton", "worker"]
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])  # the worker's own parser
    assert (args.role, args.model, args.port, args.kv_port) == ("decode", "/models/m", 8000, 15000)
    assert args.host == "0.0.0.0"  # the pod IP: kubelet probes and peers must reach it
    assert args.served_model_name == "m"  # spec.model.name, not the folder's name
    assert (args.max_num_seqs, args.kv_blocks) == (8, 64)
    assert c["args"][-4:] == ["--max-num-seqs", "8", "--kv-blocks", "64"]  # user args last: they win
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    # /metrics for Prometheus on a port of its own, which the worker's own parser takes
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 8000), ("kv", 15000), ("metrics", 9400)]
    assert args.metrics_port == 9400


def test_vllm_worker_command() -> None:
    c = pod(render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1", "args": ["--enforce-eager"]},
                        prefill={"tensorParallel": 4})), "prefill")["containers"][0]
    assert c["image"] == "vllm/vllm-openai:v1"
    assert c["command"] == ["vllm", "serve"]
    assert [p["name"] for p in c["ports"]] == ["http", "kv"]  # vLLM has no metrics port: /metrics on http
    assert "--metrics-port" not in c["args"]
    assert c["args"][0] == "/models/m"
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "4"
    assert c["args"][c["args"].index("--port") + 1] == "8000"
    kv = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}  # gpu: vLLM's default buffer
    assert c["args"][-1] == "--enforce-eager"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # vLLM has no /ready
    env = {e["name"]: e for e in c["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "14579"
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_IP") < names.index("VLLM_NIXL_SIDE_CHANNEL_HOST")  # $(POD_IP) expands


def test_grace_period_is_the_workers_own_drain_budget() -> None:
    """terminationGracePeriodSeconds is the rendered --drain-timeout plus slack, per role; a prefill drain covers one
    KV lease after the accept window and queued prefills; a longer lease in the args moves both."""
    from baton import launch
    from baton.cli import build_parser

    def drain(manifests: list[dict], role: str) -> tuple[object, int]:
        p = pod(manifests, role)
        c = p["containers"][0]
        return build_parser().parse_args([*c["command"][1:], *c["args"]]), p["terminationGracePeriodSeconds"]

    plain = render(base())
    args, grace = drain(plain, "prefill")
    assert args.kv_lease_seconds == launch.KV_LEASE_SECONDS == 30
    assert args.drain_timeout == launch.DRAIN_ACCEPT_SECONDS + launch.PREFILL_DRAIN_QUEUE_SECONDS + 30 == 60
    assert grace == 70
    args, grace = drain(plain, "decode")
    assert (args.drain_timeout, grace) == (launch.STREAM_DRAIN_SECONDS, 120)
    assert "lifecycle" not in pod(plain, "prefill")["containers"][0]  # a Baton worker drains by itself

    longer = render(base(engine={"kind": "baton", "args": ["--kv-lease-seconds", "100"]},
                         decode={"extraArgs": ["--drain-timeout=300"]}))
    args, grace = drain(longer, "prefill")
    assert (args.kv_lease_seconds, args.drain_timeout, grace) == (100, 130, 140)
    args, grace = drain(longer, "decode")
    assert (args.drain_timeout, grace) == (300, 310)


def test_vllm_workers_wait_for_the_endpoint_removal_in_a_pre_stop_hook() -> None:
    from baton import launch

    manifests = render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}))
    for role in ("prefill", "decode"):
        p = pod(manifests, role)
        assert p["containers"][0]["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
        args = p["containers"][0]["args"]
        # vLLM drains (instead of aborting) for --shutdown-timeout seconds after the preStop sleep, in the grace
        drain = int(args[args.index("--shutdown-timeout") + 1])
        assert drain == launch.drain_timeout_seconds(role)
        assert p["terminationGracePeriodSeconds"] == 5 + drain + launch.GRACE_SLACK_SECONDS
        assert "--drain-timeout" not in args  # not vLLM's flag
    assert "lifecycle" not in pod(manifests, "router")["containers"][0]


def test_router_may_read_exactly_its_two_endpoints() -> None:
    m = render(base())
    role = next(x for x in m if x["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["endpoints"],
                              "resourceNames": ["svc-prefill", "svc-decode"], "verbs": ["get"]}]
    binding = next(x for x in m if x["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    router = pod(m, "router")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": router["serviceAccountName"],
                                    "namespace": "ns"}]
    assert router.get("automountServiceAccountToken", True) is True  # the router needs its token
    for role_ in ("prefill", "decode"):
        assert pod(m, role_)["automountServiceAccountToken"] is False  # workers cannot use the grant


def test_router_command_and_image() -> None:
    from baton.cli import build_parser

    m = render(base(router={"policy": "prefix-aware", "replicas": 3},
                    engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"}))
    c = pod(m, "router")["containers"][0]
    assert c["command"] == ["baton", "router"]
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert (args.policy, args.port, args.namespace) == ("prefix-aware", 8080, "ns")
    assert (args.prefill_service, args.decode_service) == ("svc-prefill", "svc-decode")
    assert args.health_path == "/health"  # vLLM serves no /ready
    assert c["image"] != "vllm/vllm-openai:v1"  # the router is Baton's, whatever the engine
    # /metrics on a port of its own, not the one the client-facing Service exposes (worker/router/cli.py)
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert args.metrics_port == 9400
    router_svc = next(d for d in m if d["kind"] == "Service" and d["spec"]["selector"].get("baton.dev/role")
                      == "router")
    assert [p["targetPort"] for p in router_svc["spec"]["ports"]] == ["http"]


def test_router_drains_within_its_grace_period() -> None:
    """SIGTERM: the router keeps serving through the accept window, then waits for the streams in flight
    (worker/router/drain.py); the pod's grace period covers both and the slack."""
    from baton import launch
    from baton.cli import build_parser

    router = pod(render(base()), "router")
    c = router["containers"][0]
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert args.drain_timeout == launch.ROUTER_DRAIN_SECONDS == launch.STREAM_DRAIN_SECONDS
    assert router["terminationGracePeriodSeconds"] >= (launch.DRAIN_ACCEPT_SECONDS + args.drain_timeout
                                                        + launch.GRACE_SLACK_SECONDS)


@pytest.mark.parametrize(("prefill", "expected"), [
    ({"replicas": 0}, None),  # a colocated layout: a decode-only fleet by design
    ({"replicas": 1}, "svc-prefill"),
    # an autoscaled prefill role may come back from 0: its Service stays the router's
    ({"replicas": 0, "autoscaling": {"mode": "baton", "minReplicas": 0}}, "svc-prefill"),
])
def test_a_decode_only_service_gives_its_router_no_prefill_service(prefill, expected) -> None:
    from baton.worker.router.cli import build_config

    from baton.cli import build_parser

    spec = {"prefill": prefill}
    if "autoscaling" in prefill:
        spec["autoscaling"] = {"prometheusURL": "http://prometheus:9090"}
    c = pod(render(base(**spec)), "router")["containers"][0]
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert (args.prefill_service, args.decode_service) == (expected, "svc-decode")
    assert build_config(args).services() == {"decode": "svc-decode", **({"prefill": expected} if expected else {})}


def test_a_slowly_starting_router_is_not_killed_by_its_liveness_probe() -> None:
    """The liveness probe (3 x 10 s) only judges a router that has started: a startupProbe with minutes of budget
    comes first, or the kubelet kills a router still importing on a CPU-starved node, over and over."""
    c = pod(render(base()), "router")["containers"][0]
    startup, liveness = c["startupProbe"], c["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert startup["periodSeconds"] <= 5  # Ready soon after it starts listening
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 60


def test_a_baton_service_that_names_its_worker_image_runs_its_router_on_it() -> None:
    """The router is `baton router`: for a Baton-engine service whose engine.image is set, that Baton worker image
    (the one the service is known to pull) rather than the operator's default, which the nodes may not have;
    spec.router.image still wins."""
    m = render(base(engine={"kind": "baton", "image": "registry.local/baton/worker:abc"}))
    assert pod(m, "router")["containers"][0]["image"] == "registry.local/baton/worker:abc"
    m = render(base(engine={"kind": "baton", "image": "registry.local/baton/worker:abc"},
                    router={"image": "registry.local/baton/router:1"}))
    assert pod(m, "router")["containers"][0]["image"] == "registry.local/baton/router:1"


def test_env_contract() -> None:
    m = render(base(engine={"kind": "baton", "env": [{"name": "EXTRA", "value": "1"}]}))
    for role in ("prefill", "decode", "router"):
        env = {e["name"]: e for e in pod(m, role)["containers"][0]["env"]}
        assert env["BATON_LLMSERVICE"]["value"] == "svc"
        assert env["BATON_ROLE"]["value"] == role
        assert env["BATON_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        if role != "router":
            assert env["BATON_KV_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "svc-kv", "key": "token"}  # required
            assert env["EXTRA"] == {"name": "EXTRA", "value": "1"}


def test_security_context() -> None:
    baton = pod(render(base()), "prefill")
    assert baton["securityContext"]["runAsNonRoot"] is True
    assert baton["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert baton["automountServiceAccountToken"] is False
    assert baton["serviceAccountName"] == "svc"
    assert baton["terminationGracePeriodSeconds"] >= 60
    vllm = pod(render(base(engine={"kind": "vllm", "image": "vllm/vllm-openai:v1"})), "prefill")
    assert "runAsNonRoot" not in vllm["securityContext"]
    assert vllm["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------------------------------- what rolls what
def _template(manifests: list[dict], role: str) -> dict:
    return deployment(manifests, role)["spec"]["template"]


def test_a_pod_template_changes_exactly_when_the_pod_would_run_differently() -> None:
    plain = render(base())
    # Model or KV transport: the workers read them (argv / env) and roll; the model name rolls the router too.
    for change, rolled in (({"model": {"name": "m2", "source": {"pvc": {"claimName": "models", "path": "m"}}}},
                            ("prefill", "decode", "router")),
                           ({"kvTransfer": {"transport": "tcp"}}, ("prefill", "decode")),
                           ({"engine": {"kind": "baton", "args": ["--max-num-seqs", "8"]}}, ("prefill", "decode")),
                           ({"router": {"policy": "round-robin"}}, ("router",))):
        changed = render(base(**change))
        for role in ("prefill", "decode", "router"):
            same = _template(plain, role) == _template(changed, role)
            assert same is (role not in rolled), (change, role)
    # The SLO is read by the operator's autoscaler, and its TPOT by the router's prefill-failure policy
    # (--tpot-slo, what whenHeadroom protects): the router rolls for the TPOT, no worker for either.
    for slo_change, rolled in (({"ttft": "200ms"}, ()), ({"tpot": "20ms"}, ("router",))):
        slo = render(base(slo=slo_change))
        for role in ("prefill", "decode", "router"):
            assert (_template(plain, role) == _template(slo, role)) is (role not in rolled), (slo_change, role)
    # Nothing a pod would read lives in a ConfigMap.
    assert "ConfigMap" not in {m["kind"] for m in plain}
    for role in ("prefill", "decode", "router"):
        assert "BATON_CONFIG" not in json.dumps(_template(plain, role))


def test_kv_secret_rotation_rolls_the_workers_only() -> None:
    rotated = base()
    rotated["metadata"]["annotations"] = {L.ANNOTATION_ROTATE_KV_SECRET: "2026-11-30"}
    a, b = render(base()), render(rotated)
    for role in ("prefill", "decode"):
        assert _template(b, role)["metadata"]["annotations"] == {L.ANNOTATION_ROTATE_KV_SECRET: "2026-11-30"}
        assert _template(a, role) != _template(b, role)
        env = {e["name"]: e for e in _template(b, role)["spec"]["containers"][0]["env"]}
        ref = env["BATON_KV_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
        assert ref.startswith("svc-kv-") and ref != "svc-kv"  # a new Secret: the operator never rewrites one
    assert _template(a, "router") == _template(b, "router")


# ---------------------------------------------------------------------------------------------- naming
def test_child_names_fit_and_stay_readable() -> None:
    name = "a" * READABLE_NAME_MAX
    for suffix in ("", "-prefill", "-decode", "-router", "-config"):
        assert child_name(name, suffix) == name + suffix
        assert is_dns_label(child_name(name, suffix))


def test_too_long_or_invalid_names_are_hashed_deterministically() -> None:
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    for suffix in ("", "-prefill"):
        a, b = child_name(long_a, suffix), child_name(long_b, suffix)
        assert len(a) <= DNS_LABEL_MAX and is_dns_label(a) and a.endswith(suffix)
        assert a != b and a == child_name(long_a, suffix)
    odd = child_name("1.model.v2", "-decode")
    assert is_dns_label(odd) and odd.endswith("-decode")
    assert label_value("short") == "short"
    assert len(label_value("y" * 100)) == DNS_LABEL_MAX
