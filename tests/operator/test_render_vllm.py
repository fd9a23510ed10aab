"""vLLM pods as rendered: the drain budget on vLLM's own flag (checked with vLLM's parser where .venv-vllm exists),
RDMA for NIXL/UCX, and engine arguments that would override the launch contract refused for both engines."""
from __future__ import annotations

import json

import pytest
from baton.operator.api import validation_errors
from baton.operator.images import ImageOptions
from baton.operator.render import render

from baton import launch

OPTS = ImageOptions(worker_image="registry.example/baton/worker:1", pull_secrets=())


def body(**spec) -> dict:
    b = {"apiVersion": "baton.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "svc", "namespace": "ns"},
         "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}},
                  "engine": {"kind": "vllm", "image": "vllm/vllm-openai:v0.10.1"}}}
    b["spec"].update(spec)
    return b


def pod(manifests: list[dict], role: str) -> dict:
    return next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == f"svc-{role}")[
        "spec"]["template"]["spec"]


def test_vllm_drains_for_the_budget_its_grace_period_covers() -> None:
    """vLLM aborts in-flight requests on SIGTERM unless --shutdown-timeout N > 0: N is the role's drain budget, and
    the grace period holds the preStop sleep (readiness/endpoint removal first), N and the slack."""
    m = render(body(), OPTS)
    for role in ("prefill", "decode"):
        p = pod(m, role)
        c = p["containers"][0]
        drain = int(c["args"][c["args"].index(launch.Flag.SHUTDOWN_TIMEOUT) + 1])
        assert drain == launch.drain_timeout_seconds(role) > 0
        pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert p["terminationGracePeriodSeconds"] >= pre_stop + drain + launch.GRACE_SLACK_SECONDS
    # the user's own budget wins, and the grace period follows it
    p = pod(render(body(decode={"extraArgs": ["--shutdown-timeout=300"]}), OPTS), "decode")
    assert p["terminationGracePeriodSeconds"] == 5 + 300 + launch.GRACE_SLACK_SECONDS


@pytest.mark.vllm
def test_vllms_own_parser_reads_the_rendered_shutdown_timeout(vllm_parser) -> None:
    m = render(body(), OPTS)
    argvs = [pod(m, role)["containers"][0]["args"] for role in ("prefill", "decode")]
    parsed = vllm_parser.parse(argvs)
    assert [p.get("shutdown_timeout", p.get("error")) for p in parsed] == [60, 110]


def _engine(m: list[dict], role: str) -> tuple[list[str], dict]:
    c = pod(m, role)["containers"][0]
    return c["args"], {e["name"]: e.get("value") for e in c["env"]}


def test_cpu_vllm_workers_run_their_model_in_the_engine_core_process() -> None:
    """On CPU nodes a vLLM pod of one rank runs its model in-process (`--distributed-executor-backend uni` with
    VLLM_ENABLE_V1_MULTIPROCESSING=0, without which vLLM's CPU platform turns it back into `mp`): no worker
    process spinning on a shared-memory queue. GPUs, more than one rank, and the user's own backend keep vLLM's
    choice."""
    flag, var = launch.Flag.DISTRIBUTED_EXECUTOR_BACKEND, launch.Env.VLLM_MULTIPROCESSING
    m = render(body(accelerator="cpu"), OPTS)
    for role in ("prefill", "decode"):
        args, env = _engine(m, role)
        assert args[args.index(flag) + 1] == "uni" and env[var] == "0"
    for spec in ({"accelerator": "gpu"}, {"accelerator": "gpu", "decode": {"tensorParallel": 2}},
                 {"accelerator": "cpu", "engine": {"kind": "vllm", "image": "v", "args": ["-pp", "2"]}},
                 {"accelerator": "cpu", "engine": {"kind": "vllm", "image": "v",
                                                   "args": ["--pipeline_parallel_size=2"]}},
                 {"accelerator": "cpu", "decode": {"extraArgs": ["--data_parallel_size", "2"]}}):
        args, env = _engine(render(body(**spec), OPTS), "decode")
        assert flag not in args and var not in env, spec
    # the user's own backend comes later on the command line (vLLM's parser: the last one wins)
    args, env = _engine(render(body(accelerator="cpu", decode={"extraArgs": [f"{flag}=mp"]}), OPTS), "decode")
    assert args.index(flag) < args.index(f"{flag}=mp")


@pytest.mark.vllm
def test_vllms_own_parser_reads_the_cpu_executor(vllm_parser) -> None:
    m = render(body(accelerator="cpu", decode={"extraArgs": ["--distributed-executor-backend", "mp"]}), OPTS)
    parsed = vllm_parser.parse([pod(m, role)["containers"][0]["args"] for role in ("prefill", "decode")])
    assert [p.get("distributed_executor_backend", p.get("error")) for p in parsed] == ["uni", "mp"]


def test_rdma_tp2_prefill_to_tp2_decode_on_gpus() -> None:
    m = render(body(accelerator="gpu", prefill={"tensorParallel": 2}, decode={"tensorParallel": 2},
                    kvTransfer={"transport": "rdma", "rdma": {"netDevices": "mlx5_0:1"}}), OPTS)
    for role in ("prefill", "decode"):
        p = pod(m, role)
        c = p["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        tls = env["UCX_TLS"].split(",")
        assert {"rc", "cuda_copy", "cuda_ipc"} <= set(tls) and "tcp" not in tls  # rdma: no silent TCP fallback
        assert env["UCX_NET_DEVICES"] == "mlx5_0:1"
        for section in ("limits", "requests"):
            assert c["resources"][section]["rdma/ib"] == "1"
            assert c["resources"][section]["nvidia.com/gpu"] == "2"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        shm = next(v for v in p["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    router = pod(m, "router")["containers"][0]
    assert "UCX_TLS" not in {e["name"] for e in router["env"]} and "rdma/ib" not in json.dumps(router["resources"])


def test_rdma_resource_name_and_count_are_configurable_and_auto_requests_no_device() -> None:
    m = render(body(kvTransfer={"transport": "rdma", "rdma": {"resource": "rdma/roce", "count": 2}},
                    engine={"kind": "vllm", "image": "v:1", "env": [{"name": "UCX_TLS", "value": "rc,cuda_copy"}]}),
               OPTS)
    c = pod(m, "decode")["containers"][0]
    assert c["resources"]["limits"]["rdma/roce"] == c["resources"]["requests"]["rdma/roce"] == "2"
    assert [e["value"] for e in c["env"] if e["name"] == "UCX_TLS"] == ["rc,cuda_copy"]  # the user's, once
    c = pod(render(body(kvTransfer={"transport": "auto"}), OPTS), "decode")["containers"][0]
    assert "rdma/ib" not in c["resources"]["limits"]  # auto must schedule without an RDMA device plugin
    assert next(e["value"] for e in c["env"] if e["name"] == "UCX_TLS").endswith(",tcp")
    c = pod(render(body(kvTransfer={"transport": "tcp"}), OPTS), "decode")["containers"][0]
    assert "UCX_TLS" not in {e["name"] for e in c["env"]} and "capabilities" not in c["securityContext"]


@pytest.mark.parametrize(("engine", "field", "args", "flag"), [
    ("vllm", "engine.args", ["--port", "9000"], "--port"),
    ("vllm", "prefill.extraArgs", ["--port=9000"], "--port"),
    ("vllm", "decode.extraArgs", ["-tp", "4"], "-tp (--tensor-parallel-size)"),
    ("vllm", "engine.args", ["--tensor_parallel_size=4"], "--tensor_parallel_size (--tensor-parallel-size)"),
    ("vllm", "engine.args", ['--kv-transfer-config={"kv_connector":"X"}'], "--kv-transfer-config"),
    ("vllm", "engine.args", ["--kv-transfer-config.kv_role=kv_both"],
     "--kv-transfer-config.kv_role (--kv-transfer-config)"),
    ("vllm", "engine.args", ["--served-model-name", "x"], "--served-model-name"),
    ("vllm", "engine.args", ["--host=127.0.0.1"], "--host"),
    ("vllm", "engine.args", ["--model", "/x"], "--model"),
    ("vllm", "engine.args", ["--max-model-len", "9"], "--max-model-len"),
    ("baton", "engine.args", ["--port", "9000"], "--port"),
    ("baton", "decode.extraArgs", ["--role=both"], "--role"),
    ("baton", "engine.args", ["--kv-transport", "nixl"], "--kv-transport"),
    ("baton", "prefill.extraArgs", ["--kv-port=1"], "--kv-port"),
    ("baton", "engine.args", ["--served-model-name", "x"], "--served-model-name"),
    ("baton", "engine.args", ["--llmservice", "x"], "--llmservice"),
    ("vllm", "engine.args", ["--otlp-traces-endpoint=http://c:4318"], "--otlp-traces-endpoint"),
    ("baton", "decode.extraArgs", ["--otlp-traces-endpoint", "http://c"], "--otlp-traces-endpoint"),
    ("baton", "engine.args", ["--metrics-port=9500"], "--metrics-port"),
])
def test_args_that_override_the_launch_contract_are_refused(engine, field, args, flag) -> None:
    role, _, key = field.partition(".")
    spec = {"engine": {"kind": engine, "image": "i:1", "args": args}} if role == "engine" else {
        "engine": {"kind": engine, "image": "i:1"}, role: {key: args}}
    problems = validation_errors(body(**spec))
    assert any(p.startswith(f"spec.{field}: {flag} is set by Baton (launch contract)") and p.endswith("remove it")
               for p in problems), problems


def test_tunable_and_unrelated_args_pass() -> None:
    assert validation_errors(body(engine={"kind": "vllm", "image": "i:1", "args": [
        "--shutdown-timeout", "30", "--enforce-eager", "--gpu-memory-utilization=0.9", "-O3"]})) == []
    assert validation_errors(body(engine={"kind": "baton", "args": [
        "--drain-timeout=0", "--kv-lease-seconds", "10", "--max-num-seqs", "16", "--log-level", "debug"]},
        accelerator="cpu")) == []


def test_the_managed_list_is_what_the_contract_renders() -> None:
    """One list: every option worker_argv puts on a pod's command line is managed, except the drain budget."""
    for engine in launch.ENGINES:
        w = launch.with_drain(launch.WorkerLaunch(engine=engine, role="decode", model_path="/m",
                                                  served_model_name="m", tensor_parallel=2, max_model_len=8))
        rendered = {a for a in launch.worker_argv(w) if a.startswith("--")}
        managed = set(launch.managed_flags(engine))
        assert rendered - managed == set(launch.TUNABLE_FLAGS[engine]) & rendered
        assert launch.Flag.PORT in managed and launch.Flag.SERVED_MODEL_NAME in managed
