"""vLLM pods on real nodes: the production engine path end to end (vLLM's CPU build, NIXL over UCX/TCP).

The vLLM image (`baton images build vllm`: docker/vllm.Dockerfile, the recipe of .venv-vllm) runs under kubelet +
containerd + runc. An LLMService with `engine.kind: vllm` (examples/smollm2-vllm-cpu.yaml, SmolLM2-135M-Instruct)
puts its prefill pod on real-0 and its decode pod on real-1; the official `openai` client, through the router's
ClusterIP, must get the greedy tokens of ONE colocated vLLM pod (a plain Deployment of the same image, no KV
connector) -- completions, chat and streaming -- and the decode pod's own counters must show the prompt tokens
came over NIXL from the other pod (`vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`,
`vllm:nixl_bytes_transferred`), not recomputed.

The same fleet then runs the production loop under a steady load: a real Prometheus scrapes the vLLM pods (labels
as the chart's PodMonitor gives them), the operator's autoscaler adds a decode pod on the broken TPOT SLO, and
pods go -- a decode pod deleted, decode scaled 2 -> 1, a rolling update to another KV layout (paired by the
fingerprints the pods report: worker/vllm_kv_layout.py), the prefill pod deleted -- with every request answered.

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
from baton.e2e.test_realnodes import _get, _k, _pods, _ready, cluster_ip, llmservice, router_sees
from baton.e2e.test_realnodes import _settled as settled

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
    """The vLLM image's reference, built (cached by content hash; `scripts/test` builds it beside the real-node
    tests) and imported into both nodes: by the cluster fixture's background import (`conftest.BackgroundImport`,
    beside the Baton-engine tests), or here if this module runs on a cluster without one."""
    t0 = time.monotonic()
    background = getattr(real_cluster, "vllm_import", None)
    if background is not None:
        image, seconds = background.wait()
        PHASE_TIMINGS["vLLM image: this module waited for the background import"] = time.monotonic() - t0
        where = "in the background"
    else:
        image = images.build_image("vllm", log=_log)
        t1 = time.monotonic()
        real_cluster.real.import_images([image.path])
        seconds, where = time.monotonic() - t1, "when this module started"
    PHASE_TIMINGS["vLLM image build (0 = cached)"] = image.seconds
    size = image.path.stat().st_size / 2**30
    PHASE_TIMINGS[f"vLLM image import into 2 nodes ({size:.1f} GiB archive, {where})"] = seconds
    return image.ref


def _colocated_manifest(image: str, model_dir: Path) -> list[dict]:
    """One colocated vLLM pod (no KV connector) on the decode pool, serving the same folder: the reference."""
    served = launch.WorkerLaunch(engine=launch.ENGINE_VLLM, role="both", model_path=f"{MODEL_MOUNT}/{model_dir.name}",
                                 served_model_name=_served_name(), max_model_len=2048, kv_buffer_device="cpu")
    served = dataclasses.replace(served, extra_args=tuple(_example()["spec"]["engine"].get("args", [])))
    command, args = launch.split_command(launch.worker_argv(served))
    env = [*({"name": k, "value": v} for k, v in launch.worker_env(served).items()),
           *_example()["spec"]["engine"]["env"], {"name": "OMP_NUM_THREADS", "value": "1"}]
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


#: what the fleet fixture lays over the example: a real Prometheus and Baton's autoscaler on decode, with a TPOT
#: SLO every decode step breaks (1 ms), so the autoscaler adds a decode pod once requests flow and its warm-up
#: window after the fleet turned Ready has passed (about when the first test ends) -- and a prefill-failure
#: policy that recomputes even without TPOT headroom (the last phase of the disruptions replaces the one
#: prefill pod)
def _autoscaled(body: dict, prometheus_url: str) -> dict:
    spec = body["spec"]
    spec["slo"] = {"ttft": "60s", "tpot": "1ms"}
    spec["decode"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}
    spec["prefill"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 1}
    spec["autoscaling"] = {"enabled": True, "prometheusURL": prometheus_url, "interval": "3s"}
    spec.setdefault("router", {})["prefillFailure"] = {"recompute": "always"}
    return body


@pytest.fixture(scope="module")
def vllm_fleet(real_cluster, release, vllm_image, smollm2_model, tmp_path_factory):
    """The example's vLLM LLMService (prefill on real-0, decode on real-1; autoscaled as `_autoscaled` says,
    from a real Prometheus on the host that finds the pods through the apiserver) and one colocated vLLM pod
    beside it, Ready. Yields (cluster, prometheus, when it was Ready). The namespace (and the GiBs its vLLM pods
    hold) goes when the module ends.

    vLLM pods start slowly on 2 loaded cores (minutes), so the module starts as few as it can: the decode pod
    the autoscaler adds may start while the first test runs, and later phases do not wait for replacements they
    do not use."""
    from baton.e2e.prometheus import KubernetesPods, LocalPrometheus
    from baton.e2e.realnode import host_ip

    c = real_cluster
    work = tmp_path_factory.mktemp("vllm-prometheus")
    prom = LocalPrometheus(work, listen=host_ip(), scrape_interval="2s",
                           kubernetes=KubernetesPods(c.api_client, work / "pods.json"))
    prom.start()
    _k(c, "create", "namespace", NS, check=False)
    t0 = time.monotonic()
    try:
        _k(c, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": _colocated_manifest(vllm_image, smollm2_model)}))
        _k(c, "apply", "-f", "-", input=yaml.safe_dump(
            _autoscaled(_service_manifest(vllm_image, smollm2_model), prom.url)))

        def ready():
            obj = llmservice(c, NAME, NS)
            if obj is None:
                return False
            status = obj.get("status") or {}
            colocated = _live(c, f"app={COLOCATED}")
            return (status.get("phase") == "Ready" and status.get("observedGeneration") == obj["metadata"]["generation"]
                    and router_sees(c, NAME, NS) and len(colocated) == 1 and _ready(colocated[0]))

        wait_for(f"LLMService {NAME} and the colocated vLLM pod Ready", ready, timeout=READY_TIMEOUT, interval=2,
                 diagnostics=lambda: _diagnostics(c))
        PHASE_TIMINGS["vLLM fleet + colocated pod Ready"] = time.monotonic() - t0
        yield c, prom, time.monotonic()
    finally:
        prom.stop()
        # the vLLM pods hold GiBs: gone before the next module. Their drains were tested above: here their API
        # objects go at once (forced; a terminating namespace takes no new pod) instead of the namespace waiting
        # out each pod's preStop and drain budget (97 s in cold run 7; a 1 s grace set after the namespace
        # deletion had begun them still took 93 s in run 8: this kubelet keeps the grace a termination began with)
        _k(c, "delete", "namespace", NS, "--wait=false", check=False)
        _k(c, "delete", "pods", "--all", "-n", NS, "--grace-period=0", "--force", "--wait=false", check=False)
        _k(c, "wait", "--for=delete", f"namespace/{NS}", "--timeout=300s", check=False, timeout=320)


def _ready_role_pods(c, role: str) -> list[dict]:
    return [p for p in _role_pods(c, role) if _ready(p)]


def _decode_counters(c) -> dict[str, dict[str, float]]:
    """{decode pod: its NIXL counters} of the Ready decode pods."""
    out = {}
    for pod in _ready_role_pods(c, "decode"):
        text = _metrics(_pod_ip(pod))
        out[pod["metadata"]["name"]] = {
            "external": _sum(text, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
            "bytes": _sum(text, "vllm:nixl_bytes_transferred_sum"),
            "failed": _sum(text, "vllm:nixl_num_failed_transfers_total")}
    return out


def test_vllm_disaggregated_on_two_real_nodes_answers_like_one_colocated_vllm_pod(vllm_fleet, vllm_image):
    """Through the router's ClusterIP, the official openai client gets the colocated vLLM pod's greedy answers,
    and the decode pods' own counters show the prompts' KV came over NIXL from the prefill pod on the other node.
    (The autoscaler may add a decode pod meanwhile: counters are summed over the Ready decode pods.)"""
    c, _, _ = vllm_fleet
    (prefill,) = _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=prefill")
    decodes = _ready_role_pods(c, "decode")
    (colocated,) = _live(c, f"app={COLOCATED}")
    # two pods, two nodes, two addresses: the KV cache crosses pods over the pod network
    assert prefill["spec"]["nodeName"] == "real-0" and {d["spec"]["nodeName"] for d in decodes} == {"real-1"}
    assert _pod_ip(prefill) not in {_pod_ip(d) for d in decodes}
    assert prefill["spec"]["containers"][0]["image"] == vllm_image
    for pod in (prefill, *decodes, colocated):
        _warm_up(_pod_ip(pod))
    before = _decode_counters(c)

    router_ip = _router_ip(c)
    t1 = time.monotonic()
    disagg = _answers(f"http://{router_ip}:80/v1")
    seconds = time.monotonic() - t1
    reference = _answers(f"http://{_pod_ip(colocated)}:{launch.DEFAULT_WORKER_PORT}/v1")
    _log(f"disaggregated answers ({seconds:.1f}s for {3 * len(PROMPTS)} requests): {disagg}")
    assert disagg == reference, f"disaggregated {disagg}\n!= colocated {reference}"
    assert "Paris" in disagg["completions"][0], disagg["completions"][0]

    after = _decode_counters(c)
    zero = {"external": 0.0, "bytes": 0.0, "failed": 0.0}
    external, nixl_bytes, failed = (sum(after[p][k] - before.get(p, zero)[k] for p in after)
                                    for k in ("external", "bytes", "failed"))
    router = _metrics_router(c)
    recomputed = _sum(router, "baton_router_requests_total", outcome="fallback_recompute")
    line = (f"vLLM on 2 real nodes: {3 * len(PROMPTS)} requests equal to one colocated vLLM pod; decode "
            f"{', '.join(sorted(after))} (real-1) got {external:.0f} prompt tokens over NIXL from prefill "
            f"{_pod_ip(prefill)} (real-0), {nixl_bytes / 2**20:.2f} MiB; {failed:.0f} failed transfers, "
            f"{recomputed:.0f} router recomputes")
    _log(line)
    REPORT_LINES.append(line)
    assert external > 0, "the decode pods computed every prompt themselves: no KV came over NIXL"
    assert nixl_bytes > 0
    assert failed == 0 and recomputed == 0, line


def _metrics_router(c) -> str:
    (router,) = _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role=router")
    status, body = _get(f"http://{_pod_ip(router)}:{launch.DEFAULT_METRICS_PORT}/metrics", timeout=10)
    assert status == 200
    return body.decode()


def _router_ip(c) -> str:
    return cluster_ip(c, NAME, NS)


def _role_pods(c, role: str) -> list[dict]:
    return _live(c, f"app.kubernetes.io/instance={NAME},baton.dev/role={role}")


def _settled(c, role: str, replicas: int, exclude: frozenset[str] = frozenset()) -> list[dict] | bool:
    """`test_realnodes._settled` for this module's LLMService."""
    return settled(c, role, replicas, exclude, ns=NS, instance=NAME)


def _handoffs(c) -> dict[str, float]:
    """The router's KV hand-offs so far by how the two workers' layouts compared (same, unknown, cross)."""
    text = _metrics_router(c)
    return {m: _sum(text, launch.Metric.ROUTER_KV_HANDOFFS, match=m) for m in launch.KV_HANDOFF_MATCHES}


def _layouts(c) -> dict[str, str | None]:
    """{pod: the KV-layout fingerprint its /health answer carries} of the worker pods."""
    import httpx

    out = {}
    for role in ("prefill", "decode"):
        for p in _role_pods(c, role):
            r = httpx.get(f"http://{_pod_ip(p)}:{launch.DEFAULT_WORKER_PORT}"
                          f"{launch.probes(launch.ENGINE_VLLM).readiness}", timeout=10)
            out[p["metadata"]["name"]] = r.headers.get(launch.Header.KV_FINGERPRINT)
    return out


#: the load's prompts (a number is appended to each): SmolLM2 continues each with text, never EOS at once
LOAD_PROMPTS = ("The capital of France is", "A short poem about the sea:", "Kubernetes schedules pods onto")


def test_vllm_fleet_scales_decode_on_its_tpot_and_fails_no_request_when_pods_go(vllm_fleet, smollm2_model):
    """A real Prometheus finds the vLLM pods through the apiserver and labels their series as the chart's
    PodMonitor does (llmservice, role); the operator's autoscaler reads it, sees the TPOT SLO broken and adds a
    decode pod, which takes traffic. Then, under a steady load: a decode pod deleted, decode scaled 2 -> 1, a
    rolling update to another KV layout (`--block-size`: the router keeps old prefill with old decode and new
    with new -- 0 hand-offs across layouts, counted by the router from the fingerprints the pods' answers
    carry), the prefill pod deleted (decode recomputes meanwhile) -- 0 failed requests and 0 empty answers (an
    empty SmolLM2 answer counts as a failure unless HF's greedy answer is empty too), numbers printed per phase.

    Phases that delete a pod end once the pod is gone and the fleet has served requests without it: its
    replacement (minutes to start a vLLM pod here) is not waited for -- the next phase's scale-down removes the
    decode one, the module's end the prefill one."""
    from baton.e2e.test_realnodes import Load

    c, prom, ready_at = vllm_fleet
    _k(c, "delete", "deployment", COLOCATED, "-n", NS, "--wait=false", check=False)  # its CPU, for new pods
    report: list[str] = []
    # one client: a steady load that leaves a core for the pods that start meanwhile
    with Load(f"http://{_router_ip(c)}:80/v1", threads=1, max_seconds=2400, model_dir=smollm2_model,
              model=_served_name(), prompts=LOAD_PROMPTS) as load:
        def phase(name: str, act, settle, timeout: float = READY_TIMEOUT, served: int = 0) -> None:
            """`act`, then wait for `settle` and for `served` more answers; counts printed."""
            ok0, failed0 = load.counts()
            t1 = time.monotonic()
            act()
            wait_for(f"{name}: the fleet to settle", lambda: settle() and load.counts()[0] >= ok0 + served,
                     timeout=timeout, interval=2, diagnostics=lambda: _diagnostics(c))
            time.sleep(3)  # traffic on the settled fleet too
            ok1, failed1 = load.counts()
            report.append(f"{name}: {ok1 - ok0} ok, {failed1 - failed0} failed, settled in "
                          f"{time.monotonic() - t1:.1f}s")

        selector = f'llmservice="{NAME}",namespace="{NS}"'

        def scraped() -> bool:  # vLLM's series, labelled from the pods as the PodMonitor labels them
            return bool(prom.query(f'{{__name__=~"vllm[:_]generation_tokens_total",{selector},role="decode"}}')
                        ) and bool(prom.query(f"baton_router_tpot_seconds_count{{{selector}}}"))

        wait_for("Prometheus to scrape the router and the vLLM decode pod (found through the apiserver)",
                 scraped, timeout=180, interval=2)
        phase("autoscaler: decode 1 -> 2 on the broken TPOT SLO", lambda: None,
              lambda: _settled(c, "decode", 2) and router_sees(c, NAME, NS, decode=2))
        PHASE_TIMINGS["vLLM autoscaler: fleet Ready -> second decode pod Ready"] = time.monotonic() - ready_at
        first, second = sorted(_role_pods(c, "decode"), key=lambda p: p["metadata"]["creationTimestamp"])
        before = _sum(_metrics(_pod_ip(second)), "vllm:generation_tokens_total")
        wait_for("the new decode pod to take traffic", lambda: _sum(
            _metrics(_pod_ip(second)), "vllm:generation_tokens_total") > before + 10, timeout=180, interval=2)
        status = llmservice(c, NAME, NS)["status"]
        assert status["decode"]["desiredReplicas"] == 2, status
        report.append(f"autoscaler: TPOT p90 {(status.get('slo') or {}).get('tpotP90')} against 1ms -> decode "
                      f"desired 2 ({status['decode'].get('lastScaleReason', '')}); the new pod "
                      f"{_pod_ip(second)} took traffic")

        gone = first["metadata"]["name"]
        phase("delete a decode pod",
              lambda: _k(c, "delete", "pod", "-n", NS, gone, "--wait=false"),
              lambda: all(p["metadata"]["name"] != gone for p in _pods(c, "baton.dev/role=decode", NS)),
              served=5)
        # its replacement is starting: the scale-down takes it (a ReplicaSet removes a pod not Ready first)
        phase("scale decode 2 -> 1",
              lambda: _k(c, "patch", "llmservice", NAME, "-n", NS, "--type=merge", "-p", json.dumps(
                  {"spec": {"decode": {"replicas": 1, "autoscaling": {"mode": "off"}}}})),
              lambda: _settled(c, "decode", 1) and router_sees(c, NAME, NS), served=5)

        # the fingerprint rollout: another KV layout (block size 128, vLLM's CPU default -> 64); old and new
        # pods run side by side and the router must hand KV only between equal layouts
        handoffs0 = _handoffs(c)
        layouts0 = _layouts(c)
        old = {r: frozenset(p["metadata"]["name"] for p in _role_pods(c, r)) for r in ("prefill", "decode")}
        phase("rolling update to another KV layout (--block-size 64)",
              lambda: _k(c, "patch", "llmservice", NAME, "-n", NS, "--type=merge", "-p", json.dumps(
                  {"spec": {"engine": {"args": [*_example()["spec"]["engine"]["args"], "--block-size", "64"]}}})),
              lambda: _settled(c, "prefill", 1, old["prefill"]) and _settled(c, "decode", 1, old["decode"])
              and router_sees(c, NAME, NS), served=5)
        layouts1 = _layouts(c)
        handoffs = {m: _handoffs(c)[m] - handoffs0[m] for m in launch.KV_HANDOFF_MATCHES}
        report.append(f"KV layouts {sorted(set(layouts0.values()))} -> {sorted(set(layouts1.values()))}; "
                      f"hand-offs during the rollout by layout: {handoffs}")
        assert len(set(layouts0.values())) == 1 and len(set(layouts1.values())) == 1, (layouts0, layouts1)
        assert set(layouts0.values()) != set(layouts1.values()), "the rollout did not change the KV layout"
        assert handoffs["cross"] == 0 and handoffs["unknown"] == 0 and handoffs["same"] > 0, handoffs

        (old_prefill,) = _role_pods(c, "prefill")
        gone = old_prefill["metadata"]["name"]
        phase("delete the prefill pod (decode recomputes meanwhile)",
              lambda: _k(c, "delete", "pod", "-n", NS, gone, "--wait=false"),
              lambda: all(p["metadata"]["name"] != gone for p in _pods(c, "baton.dev/role=prefill", NS)),
              served=5)
    ok, failed = load.counts()
    router = _metrics_router(c)
    outcomes = {o: _sum(router, "baton_router_requests_total", outcome=o) for o in ("ok", "fallback_recompute", "error")}
    summary = "\n".join(report) + (f"\ntotal: {ok} ok ({load.empty_ok} empty, as HF's greedy answer), "
                                   f"{failed} failed; router outcomes {outcomes}")
    _log(summary)
    REPORT_LINES.extend(f"vLLM fleet under load: {line}" for line in summary.splitlines())
    assert ok > 20, summary
    assert failed == 0, summary + "\nfirst failures:\n" + "\n".join(load.failed[:10])
