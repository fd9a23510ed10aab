"""vLLM pods on real nodes: the production engine path end to end (vLLM's CPU build, NIXL over UCX/TCP).

The vLLM image (`baton images build vllm`: docker/vllm.Dockerfile, the recipe of .venv-vllm) runs under kubelet +
containerd + runc. An LLMService with `engine.kind: vllm` (examples/smollm2-vllm-cpu.yaml, SmolLM2-135M-Instruct)
puts its prefill pod on real-0 and its decode pod on real-1; the official `openai` client, through the router's
ClusterIP, must get the greedy tokens of ONE colocated vLLM pod (a plain Deployment of the same image, no KV
connector) -- completions, chat and streaming -- and the decode pod's own counters must show the prompt tokens
came over NIXL from the other pod (`vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`,
`vllm:nixl_bytes_transferred`), not recomputed.

The image is GBs: it is imported into the nodes when this module first needs it (timed in the phase report).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from baton.e2e import images
from baton.e2e.fixtures import PHASE_TIMINGS, REPORT_LINES
from baton.e2e.processes import wait_for
from baton.e2e.test_realnodes import _get, _k, _pods, _ready, router_sees

from baton import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
NS = "vllm"
NAME = "smollm2-vllm"
COLOCATED = "vllm-colocated"
MODEL_MOUNT = "/models"
PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a small village",
    # > 128 tokens: more than one KV block (vLLM's CPU block size) crosses NIXL
    " ".join(["Kubernetes runs containers in pods and an operator watches custom resources."] * 12),
]
MAX_TOKENS = 16
#: a vLLM pod on a loaded 2-core machine: engine start, model load, first forward
READY_TIMEOUT = 900


def _log(msg: str) -> None:
    print(f"[real nodes, vLLM] {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def vllm_image(real_cluster) -> str:
    """The vLLM image's reference, built (cached by content hash; `scripts/test` builds it beside the unit tests)
    and imported into both nodes."""
    image = images.build_image("vllm", log=_log)
    PHASE_TIMINGS["vLLM image build (0 = cached)"] = image.seconds
    size = image.path.stat().st_size / 2**30
    t0 = time.monotonic()
    real_cluster.real.import_images([image.path])
    PHASE_TIMINGS[f"vLLM image import into 2 nodes ({size:.1f} GiB archive)"] = time.monotonic() - t0
    return image.ref


def _colocated_manifest(image: str, model_dir: Path) -> list[dict]:
    """One colocated vLLM pod (no KV connector) on the decode pool, serving the same folder: the reference."""
    served = launch.WorkerLaunch(engine=launch.ENGINE_VLLM, role="both", model_path=f"{MODEL_MOUNT}/{model_dir.name}",
                                 served_model_name=_served_name(), max_model_len=2048)
    served = dataclasses.replace(served, extra_args=tuple(_example()["spec"]["engine"].get("args", [])))
    command, args = launch.split_command(launch.worker_argv(served))
    env = [*_example()["spec"]["engine"]["env"], {"name": "OMP_NUM_THREADS", "value": "1"}]
    labels = {"app": COLOCATED}
    return [{
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": COLOCATED, "namespace": NS},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "nodeSelector": {"baton.dev/pool": "decode"},
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "vllm", "image": image, "imagePullPolicy": "Never",
                    "command": command, "args": args, "env": env,
                    "ports": [{"name": "http", "containerPort": launch.DEFAULT_WORKER_PORT}],
                    "readinessProbe": {"httpGet": {"path": launch.probes(launch.ENGINE_VLLM).readiness,
                                                   "port": "http"}, "periodSeconds": 2},
                    "resources": {"requests": {"cpu": "500m", "memory": "2Gi"},
                                  "limits": {"cpu": "1", "memory": "4Gi"}},
                    "volumeMounts": [{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True},
                                     {"name": "dshm", "mountPath": "/dev/shm"}],  # as render gives vLLM pods
                }],
                "volumes": [{"name": "models", "hostPath": {"path": str(model_dir.parent), "type": "Directory"}},
                            {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
            }}}}]


def _example() -> dict:
    return yaml.safe_load((REPO / "examples" / "smollm2-vllm-cpu.yaml").read_text())


def _served_name() -> str:
    return _example()["spec"]["model"]["name"]


def _service_manifest(image: str, model_dir: Path) -> dict:
    body = _example()
    body["metadata"]["namespace"] = NS
    body["spec"]["model"]["source"] = {"hostPath": {"path": str(model_dir)}}
    body["spec"]["engine"]["image"] = image
    return body


def _pod_ip(pod: dict) -> str:
    return pod["status"]["podIP"]


def _live(c, selector: str) -> list[dict]:
    return [p for p in _pods(c, selector, NS) if not p["metadata"].get("deletionTimestamp")]


def _metrics(ip: str) -> str:
    status, body = _get(f"http://{ip}:{launch.DEFAULT_WORKER_PORT}/metrics", timeout=10)
    assert status == 200, f"GET {ip}/metrics: {status}"
    return body.decode()


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head = line.rsplit(" ", 1)[0]
        if head.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _answers(base_url: str) -> dict[str, list]:
    """Greedy completions (token ids too), chat and streamed completions through the official openai client."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    model = _served_name()
    out: dict[str, list] = {"completions": [], "chat": [], "stream": []}
    for prompt in PROMPTS:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        out["completions"].append(r.choices[0].text)
        c = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
        out["chat"].append(c.choices[0].message.content)
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        out["stream"].append("".join(ch.choices[0].text for ch in chunks if ch.choices))
    return out


def _warm_up(ip: str) -> None:
    """One plain completion straight to a vLLM pod: its first forward is slow on a loaded machine and would
    otherwise be paid inside a router hop (with the hop's timeout)."""
    import httpx

    r = httpx.post(f"http://{ip}:{launch.DEFAULT_WORKER_PORT}/v1/completions", timeout=600,
                   json={"model": _served_name(), "prompt": "warm up", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, (ip, r.status_code, r.text[:300])


def _diagnostics(c) -> str:
    parts = [_k(c, "get", "pods,events", "-n", NS, "-o", "wide", check=False).stdout]
    for p in _pods(c, "app.kubernetes.io/instance=" + NAME, NS) + _pods(c, f"app={COLOCATED}", NS):
        parts.append(f"--- logs of {p['metadata']['name']}:\n"
                     + _k(c, "logs", "-n", NS, p["metadata"]["name"], "--tail", "40", check=False).stdout)
    parts.append(_k(c, "logs", "-n", "baton-system", "-l", "app.kubernetes.io/component=operator", "--tail", "40",
                    check=False).stdout)
    return "\n".join(parts)


def test_vllm_disaggregated_on_two_real_nodes_answers_like_one_colocated_vllm_pod(
        real_cluster, release, vllm_image, smollm2_model):
    c = real_cluster
    _k(c, "create", "namespace", NS, check=False)
    t0 = time.monotonic()
    try:
        _k(c, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": _colocated_manifest(vllm_image, smollm2_model)}))
        _k(c, "apply", "-f", "-", input=yaml.safe_dump(_service_manifest(vllm_image, smollm2_model)))

        def ready():
            obj = json.loads(_k(c, "get", "llmservice", NAME, "-n", NS, "-o", "json").stdout)
            status = obj.get("status") or {}
            colocated = _live(c, f"app={COLOCATED}")
            return (status.get("phase") == "Ready" and status.get("observedGeneration") == obj["metadata"]["generation"]
                    and router_sees(c, NAME, NS) and len(colocated) == 1 and _ready(colocated[0]))

        wait_for(f"LLMService {NAME} and the colocated vLLM pod Ready", ready, timeout=READY_TIMEOUT, interval=2,
                 diagnostics=lambda: _diagnostics(c))
        PHASE_TIMINGS["vLLM fleet + colocated pod Ready"] = time.monotonic() - t0

        (prefill,) = _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=prefill")
        (decode,) = _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=decode")
        (colocated,) = _live(c, f"app={COLOCATED}")
        # two pods, two nodes, two addresses: the KV cache crosses pods over the pod network
        assert (prefill["spec"]["nodeName"], decode["spec"]["nodeName"]) == ("real-0", "real-1")
        assert _pod_ip(prefill) != _pod_ip(decode)
        assert prefill["spec"]["containers"][0]["image"] == vllm_image
        for pod in (prefill, decode, colocated):
            _warm_up(_pod_ip(pod))
        decode_before = _metrics(_pod_ip(decode))

        router_ip = _k(c, "get", "svc", NAME, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        t1 = time.monotonic()
        disagg = _answers(f"http://{router_ip}:80/v1")
        seconds = time.monotonic() - t1
        reference = _answers(f"http://{_pod_ip(colocated)}:{launch.DEFAULT_WORKER_PORT}/v1")
        _log(f"disaggregated answers ({seconds:.1f}s for {3 * len(PROMPTS)} requests): {disagg}")
        assert disagg == reference, f"disaggregated {disagg}\n!= colocated {reference}"
        assert "Paris" in disagg["completions"][0], disagg["completions"][0]

        decode_after = _metrics(_pod_ip(decode))
        external = (_sum(decode_after, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                    - _sum(decode_before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"))
        nixl_bytes = (_sum(decode_after, "vllm:nixl_bytes_transferred_sum")
                      - _sum(decode_before, "vllm:nixl_bytes_transferred_sum"))
        failed = _sum(decode_after, "vllm:nixl_num_failed_transfers_total")
        router = _metrics_router(c)
        recomputed = _sum(router, "baton_router_requests_total", outcome="fallback_recompute")
        line = (f"vLLM on 2 real nodes: {3 * len(PROMPTS)} requests equal to one colocated vLLM pod; decode "
                f"{_pod_ip(decode)} (real-1) got {external:.0f} prompt tokens over NIXL from prefill "
                f"{_pod_ip(prefill)} (real-0), {nixl_bytes / 2**20:.2f} MiB; {failed:.0f} failed transfers, "
                f"{recomputed:.0f} router recomputes")
        _log(line)
        REPORT_LINES.append(line)
        assert external > 0, "the decode pod computed every prompt itself: no KV came over NIXL"
        assert nixl_bytes > 0
        assert failed == 0 and recomputed == 0, line
    finally:
        # the vLLM pods hold GiBs: gone before the next test (the grace period covers vLLM's drain)
        _k(c, "delete", "namespace", NS, "--wait=true", check=False, timeout=300)


def _metrics_router(c) -> str:
    (router,) = _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=router")
    status, body = _get(f"http://{_pod_ip(router)}:{launch.DEFAULT_ROUTER_PORT}/metrics", timeout=10)
    assert status == 200
    return body.decode()
