"""Real nodes, for real: the worker image built from docker/worker.Dockerfile runs under kubelet + containerd +
runc on two nodes; readiness probes gate Ready; pod IPs and a ClusterIP answer from the host; `kubectl logs`
works; a deleted pod is replaced; and stopping the cluster leaves nothing of ours on the host.

Slow (a cold machine builds kubelet, a base image and the worker image first: see the printed phase timings).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

import pytest
from baton.e2e import build as k8sbuild
from baton.e2e import hostclean
from baton.e2e.conftest import FLEET_NS, MODEL_NAME, WATCHED_NAMESPACES
from baton.e2e.fixtures import PHASE_TIMINGS, REPORT_LINES, api_get, get_llmservice, kubectl
from baton.e2e.pki import self_signed_cert
from baton.e2e.processes import https_server, wait_for
from baton.worker import smollm2

from baton import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

def _log(msg: str) -> None:
    print(f"[real nodes] {msg}", file=sys.stderr, flush=True)


def _k(cluster, *args: str, input: str | None = None, check: bool = True, timeout: float = 60):
    return kubectl(*args, kubeconfig=cluster.kubeconfig, input=input, check=check, timeout=timeout)


def _get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:  # refused / reset / timed out: not listening (yet)
        return 0, b""


def _pods(c, selector: str, ns: str = "default") -> list[dict]:
    """The pods of `ns` that match a label selector (read in-process: what the polls call; see `api_get`)."""
    return api_get(f"/api/v1/namespaces/{ns}/pods", kubeconfig=c.kubeconfig, query={"labelSelector": selector})["items"]


def cluster_ip(c, service: str, ns: str) -> str:
    """The ClusterIP of Service `service` in `ns` ("" while it does not exist)."""
    svc = api_get(f"/api/v1/namespaces/{ns}/services/{service}", kubeconfig=c.kubeconfig)
    return svc["spec"].get("clusterIP", "") if svc else ""


def llmservice(c, name: str, ns: str) -> dict | None:
    """LLMService `name` of `ns` as the API server has it (None while it does not exist)."""
    return get_llmservice(name, ns, kubeconfig=c.kubeconfig)


def _ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


def _worker_manifest(image: str, model_dir: Path, ready_path: str = "/ready") -> str:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "replicas": 2,
            # one pod per node (anti-affinity) leaves no room for a surge pod: replace, don't surge
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "tiny"}},
            "template": {
                "metadata": {"labels": {"app": "tiny"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    # one pod per real node
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"labelSelector": {"matchLabels": {"app": "tiny"}},
                                 "topologyKey": "kubernetes.io/hostname"}
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": ["worker", "--role", "both", "--model", "/models/tiny-llama",
                                     "--served-model-name", MODEL_NAME, "--host", "0.0.0.0", "--port", "8000"],
                            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": ready_path, "port": "http"},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                        }
                    ],
                    "volumes": [{"name": "models", "hostPath": {"path": str(model_dir.parent), "type": "Directory"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {"selector": {"app": "tiny"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [deployment, service]})


CRASHER = r"""
import json, os, signal, sys
from baton.e2e.cluster import LocalCluster
from baton.e2e.fixtures import kubectl
from baton.e2e.images import PAUSE_REF

c = LocalCluster(real_nodes=1, run_dir=sys.argv[1], keep_run_dir=True)
c.start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
       "spec": {"containers": [{"name": "p", "image": PAUSE_REF, "imagePullPolicy": "Never"}]}}
kubectl("apply", "-f", "-", kubeconfig=c.kubeconfig, input=json.dumps(pod), check=True)
kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=120s", kubeconfig=c.kubeconfig, check=True, timeout=130)
print("RUNNING", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind: a crashed test run
"""


def test_cluster_down_recovers_a_crashed_run(tmp_path):
    """A test process killed with a pod running leaves shims, containers, mounts, a bridge, iptables chains and
    cgroups behind; `baton cluster down` (of any name: the crashed run had none) removes all of it."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "run")], text=True,
                          capture_output=True, timeout=300, check=False)
    assert "RUNNING" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    rec = hostclean.read_record()
    assert rec is not None
    left = hostclean.leftovers(rec)
    assert any("in our cgroups" in x for x in left), left  # the pod's processes outlived the crash
    assert any(x.startswith("interface") for x in left) and any(x.startswith("mount") for x in left), left
    down = subprocess.run([sys.executable, "-m", "baton.cli", "cluster", "down", "--name", "no-such-cluster"],
                          text=True, capture_output=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert hostclean.leftovers(rec) == []
    assert hostclean.read_record() is None


def test_nodes_are_real_and_in_their_pools(real_cluster):
    nodes = json.loads(_k(real_cluster, "get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(by_name) == {"real-0", "real-1"}
    assert by_name["real-0"]["metadata"]["labels"]["baton.dev/pool"] == "prefill"
    assert by_name["real-1"]["metadata"]["labels"]["baton.dev/pool"] == "decode"
    for n in nodes:
        info = n["status"]["nodeInfo"]
        assert info["containerRuntimeVersion"].startswith("containerd://"), info
        assert info["kubeletVersion"] == k8sbuild.K8S_VERSION
        assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"  # fake GPUs, the extended-resource way
        assert not [t for t in n["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]


def test_worker_image_serves_on_real_nodes(real_cluster, tiny_model):
    c = real_cluster
    try:
        # A probe on a path the worker does not serve: the pods run but must never turn Ready.
        _k(c, "apply", "-f", "-", input=_worker_manifest(c.worker_ref, tiny_model, ready_path="/nope"))
        running = wait_for(
            "2 worker containers running",
            lambda: (p := _pods(c, "app=tiny")) and len(p) == 2
            and all(cs.get("state", {}).get("running") for x in p for cs in x["status"].get("containerStatuses", []))
            and all(x["status"].get("containerStatuses") for x in p) and p,
            timeout=180,
        )
        assert {p["spec"]["nodeName"] for p in running} == {"real-0", "real-1"}
        # the engine is up (it answers /ready from the host) yet the pod stays unready: the kubelet probes for real
        ips = [p["status"]["podIP"] for p in running]
        wait_for("worker /ready on both pod IPs", lambda: all(_get(f"http://{ip}:8000/ready")[0] == 200 for ip in ips),
                 timeout=180)
        time.sleep(3)
        assert not any(_ready(p) for p in _pods(c, "app=tiny")), "Ready although the readiness probe fails"

        # The right probe: a rollout to Ready pods.
        _k(c, "apply", "-f", "-", input=_worker_manifest(c.worker_ref, tiny_model))
        _k(c, "rollout", "status", "deployment/tiny", "-n", "default", "--timeout=240s", timeout=250)
        pods = wait_for("2 Ready pods", lambda: (p := [x for x in _pods(c, "app=tiny") if _ready(x)]) and len(p) == 2 and p,
                        timeout=180)
        assert {p["spec"]["nodeName"] for p in pods} == {"real-0", "real-1"}
        for p in pods:  # pod IPs answer from the host
            status, body = _get(f"http://{p['status']['podIP']}:8000/v1/models")
            assert status == 200 and MODEL_NAME in body.decode(), body

        # the ClusterIP answers (kube-proxy iptables); with both pods behind it, both get traffic
        svc = json.loads(_k(c, "get", "svc", "tiny", "-n", "default", "-o", "json").stdout)
        cluster_ip = svc["spec"]["clusterIP"]
        status, body = _get(f"http://{cluster_ip}:80/v1/models")
        assert status == 200 and MODEL_NAME in body.decode()
        req = urllib.request.Request(
            f"http://{cluster_ip}:80/v1/completions",
            data=json.dumps({"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            completion = json.loads(resp.read())
        assert completion["choices"][0]["text"], completion
        assert completion["usage"]["completion_tokens"] == 4

        # kubectl logs goes apiserver -> kubelet (client certificate) -> containerd. Waited for, not read once:
        # cold run 6 read an empty log once, on a machine at load average 22 (a container that had just been
        # restarted logs its start-up lines a little later); the restart count is in the message.
        name = pods[0]["metadata"]["name"]

        def startup_logged() -> bool:
            logs = _k(c, "logs", "-n", "default", name, timeout=30).stdout
            return "Uvicorn running" in logs or "Application startup complete" in logs

        def restarts() -> str:
            pod = json.loads(_k(c, "get", "pod", "-n", "default", name, "-o", "json").stdout)
            counts = [s.get("restartCount") for s in pod["status"].get("containerStatuses", [])]
            return f"container restarts: {counts}"

        wait_for(f"kubectl logs {name} to show the worker's start-up", startup_logged, timeout=120, interval=2,
                 diagnostics=restarts)

        # a deleted pod is replaced, on a real node, and the replacement turns Ready
        victim = pods[0]["metadata"]["name"]
        _k(c, "delete", "pod", "-n", "default", victim, "--wait=false")
        wait_for(
            "a Ready replacement",
            lambda: (p := [x for x in _pods(c, "app=tiny") if _ready(x) and x["metadata"]["name"] != victim
                           and not x["metadata"].get("deletionTimestamp")]) and len(p) == 2 and p,
            timeout=240,
        )
        assert {p["spec"]["nodeName"] for p in _pods(c, "app=tiny") if _ready(p)} <= {"real-0", "real-1"}
    finally:  # the cluster is shared by every real-node test: leave nothing running
        _k(c, "delete", "deployment,service", "tiny", "-n", "default", "--wait=false", check=False)


# ------------------------------------------------------------------------------------------------
# the whole system: the chart's operator pod, an LLMService served by real pods


REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The baton passes", "Once upon a time", "Kubernetes operators"]


def _run(*argv: str, timeout: float = 300, check: bool = True):
    import subprocess

    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:3])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _fleet_manifest(worker_ref: str, model_dir: Path) -> dict:
    import yaml

    body = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
    body["metadata"]["namespace"] = FLEET_NS
    body["spec"]["model"]["source"] = {"hostPath": {"path": str(model_dir)}}
    body["spec"]["engine"]["image"] = worker_ref
    return body


def _greedy(base_url: str) -> dict[str, list[str]]:
    """Completions, chat and streamed completions, greedy, through the official openai client."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    out: dict[str, list[str]] = {"completions": [], "chat": [], "stream": []}
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
        out["completions"].append(r.choices[0].text)
        c = client.chat.completions.create(model=MODEL_NAME, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
        out["chat"].append(c.choices[0].message.content)
        chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True)
        out["stream"].append("".join(ch.choices[0].text for ch in chunks if ch.choices))
    return out


def _reference_from_baton_up(model_dir: Path, tmp_path: Path) -> dict[str, list[str]]:
    """The same LLMService as local processes (`baton up`): the tokens the cluster must reproduce."""
    from baton.worker.local_fleet import Capabilities, LocalFleet, load_spec, plan_fleet

    svc = load_spec(REPO / "examples" / "tiny-local.yaml")
    plan = plan_fleet(svc, model_path=str(model_dir), caps=Capabilities.detect(), pin=False)
    fleet = LocalFleet(plan, tmp_path / "baton-up", log=_log)
    fleet.start()
    try:
        fleet.wait_ready(timeout=300, progress=False)
        return _greedy(plan.endpoint)
    finally:
        fleet.stop()


def test_operator_runs_as_a_pod_and_its_webhook_refuses_bad_llmservices(real_cluster, release):
    c = real_cluster
    pods = json.loads(_k(c, "get", "pods", "-n", "baton-system", "-o", "json").stdout)["items"]
    (op,) = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    assert _ready(op) and op["spec"]["nodeName"] in ("real-0", "real-1")
    assert op["spec"]["containers"][0]["image"] == c.operator_ref
    _k(c, "create", "namespace", FLEET_NS, check=False)
    bad = (REPO / "tests" / "operator" / "bad" / "baton-rdma.yaml").read_text()

    def webhook_answer():
        """The apply's result once the webhook answered; None while the apiserver cannot reach it yet. The pod
        turns Ready only once its webhook port listens (the chart's readinessProbe); kube-proxy then needs a
        moment to route the Service to it."""
        out = _k(c, "apply", "-n", FLEET_NS, "-f", "-", input=bad, check=False)
        return None if out.returncode != 0 and "failed calling webhook" in out.stderr else out

    out = wait_for("the operator pod's webhook to answer", webhook_answer, timeout=60)
    assert out.returncode != 0, f"a bad LLMService was admitted: {out.stdout}"
    assert "spec.kvTransfer.transport" in out.stderr, out.stderr
    assert "denied the request" in out.stderr, out.stderr  # the operator pod's webhook said no
    # A namespaced operator (the chart's default mode): its ServiceAccount's rights end at the watched namespaces
    as_operator = "--as=system:serviceaccount:baton-system:baton"
    checked = []
    for verb, res in (("create", "deployments.apps"), ("patch", "llmservices.baton.dev/status"),
                      ("create", "secrets"), ("create", "rolebindings.rbac.authorization.k8s.io"),
                      ("delete", "services")):
        for ns in WATCHED_NAMESPACES:
            assert _k(c, "auth", "can-i", verb, res, "-n", ns, as_operator, check=False).stdout.strip() == "yes"
        for ns in ("default", "kube-system", "baton-system"):
            out = _k(c, "auth", "can-i", verb, res, "-n", ns, as_operator, check=False)
            assert out.stdout.strip() == "no", (verb, res, ns, out.stdout, out.stderr)
        checked.append(f"{verb} {res}")
    for verb, res in (("list", "llmservices.baton.dev"), ("create", "deployments.apps"), ("get", "secrets")):
        out = _k(c, "auth", "can-i", verb, res, "--all-namespaces", as_operator, check=False)
        assert out.stdout.strip() == "no", (verb, res, out.stdout)
        checked.append(f"{verb} {res} --all-namespaces: no")
    print(f"operator ServiceAccount: yes in {', '.join(WATCHED_NAMESPACES)}, no in default/kube-system/baton-system "
          f"for: {'; '.join(checked)}")


def router_sees(c, name: str, ns: str = FLEET_NS, *, prefill: int = 1, decode: int = 1) -> bool:
    """Whether LLMService `name`'s router (its /ready through the ClusterIP) counts at least `prefill` and
    `decode` healthy workers. An LLMService turns Ready when its pods are, but its router finds a prefill pod
    that turned Ready last only on its next Endpoints read and health check (seconds later on a loaded
    machine); a load started before that meets a prefill tier it has not seen yet -- with a strict TPOT SLO,
    503s by the prefill-failure policy. A client that needs every request served waits for this."""
    ip = cluster_ip(c, name, ns)
    status, body = _get(f"http://{ip}:80/ready") if ip else (0, b"")
    try:
        workers = json.loads(body).get("workers", {}) if status == 200 else {}
    except ValueError:
        return False
    return (workers.get("prefill", {}).get("healthy", 0) >= prefill
            and workers.get("decode", {}).get("healthy", 0) >= decode)


def deploy_tiny(c, model_dir: Path) -> float:
    """Apply LLMService `tiny` (examples/tiny-local.yaml on this tree's image: 1 prefill, 1 decode, 1 router)
    in FLEET_NS -- creating the namespace, resetting any change an earlier test made -- and wait until the
    operator has observed it, it is Ready and each role runs exactly its one current pod. Returns the seconds
    it took. Every test that needs the fleet calls this (the `tiny_fleet` fixture), so none depends on an
    earlier test having deployed it, or on how an earlier test left it."""
    import yaml

    _k(c, "create", "namespace", FLEET_NS, check=False)
    t0 = time.monotonic()
    _k(c, "apply", "-f", "-", input=yaml.safe_dump(_fleet_manifest(c.worker_ref, model_dir)))

    def ready():
        obj = llmservice(c, "tiny", FLEET_NS)
        if obj is None:
            return False
        status = obj.get("status") or {}
        return (status.get("observedGeneration") == obj["metadata"]["generation"] and status.get("phase") == "Ready"
                and _settled(c, "prefill", 1) and _settled(c, "decode", 1) and router_sees(c, "tiny"))

    try:
        wait_for("LLMService tiny Ready", ready, timeout=300, interval=1)
    except AssertionError:
        print(_k(c, "get", "pods,events", "-n", FLEET_NS, "-o", "wide", check=False).stdout, file=sys.stderr)
        print(_k(c, "logs", "-n", "baton-system", "-l", "app.kubernetes.io/component=operator", "--tail", "60",
                 check=False).stdout, file=sys.stderr)
        raise
    return time.monotonic() - t0


@pytest.fixture
def tiny_fleet(real_cluster, release, tiny_model):
    """The `tiny` LLMService, deployed and settled as examples/tiny-local.yaml describes it (`deploy_tiny`)."""
    deploy_tiny(real_cluster, tiny_model)
    return real_cluster


def test_llmservice_serves_on_real_nodes_like_baton_up(real_cluster, release, tiny_model, tmp_path):
    c = real_cluster
    took = deploy_tiny(c, tiny_model)
    c.timings["LLMService apply -> Ready"] = took
    pods = json.loads(_k(c, "get", "pods", "-n", FLEET_NS, "-o", "json").stdout)["items"]
    placed = {(p["metadata"]["labels"]["baton.dev/role"], p["spec"]["nodeName"]) for p in pods}
    assert ("prefill", "real-0") in placed and ("decode", "real-1") in placed, placed
    assert not [r for r, n in placed if r == "prefill" and n != "real-0"]
    for p in pods:
        assert _ready(p), p["metadata"]["name"]
        limits = p["spec"]["containers"][0]["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in limits  # a CPU service
    secret = _k(c, "get", "secret", "tiny-kv", "-n", FLEET_NS, "-o", "jsonpath={.data.token}").stdout
    assert len(secret) > 40  # the operator made the KV secret the workers require

    router_ip = cluster_ip(c, "tiny", FLEET_NS)
    got = _greedy(f"http://{router_ip}:80/v1")
    want = _reference_from_baton_up(tiny_model, tmp_path)
    assert got == want
    assert all(got["completions"]) and got["stream"] == got["completions"]
    # the router's metrics (they name the worker pods' IPs) on the pod's own metrics port, not behind the
    # client-facing Service
    (router_pod,) = [x for x in _pods(c, "baton.dev/role=router", FLEET_NS) if _ready(x)][:1]
    status, body = _get(f"http://{router_pod['status']['podIP']}:{launch.DEFAULT_METRICS_PORT}/metrics")
    assert status == 200 and b"baton_router_requests_total" in body, status
    assert _get(f"http://{router_ip}:80/metrics")[0] == 404
    # a Baton worker's metrics port (what Prometheus scrapes, all its NetworkPolicy opens): /metrics, no API
    (decode_pod,) = [x for x in _pods(c, "baton.dev/role=decode", FLEET_NS) if _ready(x)][:1]
    decode_ip = decode_pod["status"]["podIP"]
    status, body = _get(f"http://{decode_ip}:{launch.DEFAULT_METRICS_PORT}/metrics")
    assert status == 200 and b"vllm:generation_tokens_total{" in body, status
    assert _get(f"http://{decode_ip}:{launch.DEFAULT_METRICS_PORT}/v1/models")[0] == 404


class Reference:
    """The colocated greedy answer to a prompt: HF transformers on the same checkpoint the fleet serves (the
    Baton engine's greedy tokens equal HF's, tests/worker). Computed only for the answers that need a second
    opinion (empty ones), one at a time."""

    def __init__(self, model_dir: Path, max_tokens: int) -> None:
        import threading

        self.model_dir, self.max_tokens = model_dir, max_tokens
        self._lock = threading.Lock()
        self._model = self._tok = None

    def __call__(self, prompt: str) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with self._lock:
            if self._model is None:
                self._tok = AutoTokenizer.from_pretrained(self.model_dir)
                self._model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
            ids = self._tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = self._model.generate(ids, max_new_tokens=self.max_tokens, do_sample=False)
            return self._tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Load:
    """Bounded closed-loop load from the host through the router's ClusterIP: `threads` clients, each sending
    greedy completions (every other one streamed) until stopped, `max_seconds` or `max_requests`. Counts every
    outcome; a failure keeps its error text.

    Every answer must be whole (`complete`): finish_reason `length` with all MAX_TOKENS tokens, or `stop`. An
    empty text is not by itself wrong -- the random tiny model's greedy answer can be special tokens only --
    so an empty answer is checked against the colocated greedy answer to the same prompt (`Reference`, from
    `model_dir`): equal, it counts as ok (`empty_ok`); otherwise text was lost on the way, a failure. Without
    `model_dir` (a real model, e.g. SmolLM2, `model` its served name) every empty answer is a failure."""

    MAX_TOKENS = 16
    #: Each client starts a request at most this often (seconds): a steady load, not a saturating one. Closed-loop
    #: clients without a pace kept ~12-18 tiny-model requests/s going (a core of the 2 the machine has), which slowed
    #: the very pod starts and rollouts the disruption tests wait for; at 3 clients this is still >= 5 requests/s.
    PACE = 0.5

    def __init__(self, base_url: str, threads: int = 3, max_seconds: float = 900, max_requests: int = 20000,
                 model_dir: Path | None = None, model: str = MODEL_NAME, prompts: tuple[str, ...] = tuple(PROMPTS),
                 pace: float = PACE):
        import threading

        self.base_url, self.threads, self.pace = base_url, threads, pace
        self.model, self.prompts = model, prompts
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.reference = Reference(model_dir, self.MAX_TOKENS) if model_dir is not None else None
        self.ok = 0
        self.empty_ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def complete(self, client, prompt: str, stream: bool) -> str:
        """One greedy completion; AssertionError for an answer that is not whole or lost its text."""
        if stream:
            text, finish, tokens = "", None, None
            for ch in client.completions.create(model=self.model, prompt=prompt, max_tokens=self.MAX_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
                if ch.choices:
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
        else:
            r = client.completions.create(model=self.model, prompt=prompt, max_tokens=self.MAX_TOKENS,
                                          temperature=0)
            text, finish, tokens = r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        how = f"{'streamed' if stream else 'plain'} answer to {prompt!r}: finish_reason {finish}, {tokens} tokens"
        if finish not in ("length", "stop") or (finish == "length" and tokens != self.MAX_TOKENS):
            raise AssertionError(f"incomplete {how}, text {text!r}")
        if not text:
            want = self.reference(prompt) if self.reference is not None else None
            if want != "":
                raise AssertionError(f"empty completion ({how}); the colocated greedy answer is {want!r}")
            with self._lock:
                self.empty_ok += 1
        return text

    def paced(self, started: float) -> None:
        """Wait until `pace` seconds after `started` (the thread's last request start), or until stopped."""
        self._stop.wait(max(0.0, started + self.pace - time.monotonic()))

    def _run(self, i: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=150)
        n, started = 0, 0.0
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            self.paced(started)
            started = time.monotonic()
            with self._lock:
                if self.ok + len(self.failed) >= self.max_requests:
                    return
            n += 1
            prompt = f"{self.prompts[n % len(self.prompts)]} {i} {n}"
            try:
                self.complete(client, prompt, stream=bool(n % 2))
                with self._lock:
                    self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with self._lock:
                    self.failed.append(f"at {time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:400])

    def __enter__(self) -> Self:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=90)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, len(self.failed)


def _role_pods(c, role: str) -> list[dict]:
    return [p for p in _pods(c, f"baton.dev/role={role}", FLEET_NS) if not p["metadata"].get("deletionTimestamp")]


def _settled(c, role: str, replicas: int, exclude: set[str] = frozenset(), template_hash: str | None = None, *,
             ns: str = FLEET_NS, instance: str | None = None):
    """`replicas` Ready pods of `role` (of LLMService `instance`, else of any) in `ns`, none of them in `exclude`,
    none terminating left over."""
    selector = f"baton.dev/role={role}" if instance is None else (
        f"app.kubernetes.io/instance={instance},baton.dev/role={role}")
    every = _pods(c, selector, ns)
    live = [p for p in every if not p["metadata"].get("deletionTimestamp")]
    if len(every) != replicas or len(live) != replicas:
        return False
    if any(p["metadata"]["name"] in exclude or not _ready(p) for p in live):
        return False
    if template_hash and any(p["metadata"]["labels"].get("pod-template-hash") != template_hash for p in live):
        return False
    return live


def _kv_pulled_bytes(c) -> float:
    """baton_kv_transfer_bytes_total summed over the decode pods (their /metrics, from the host)."""
    total = 0.0
    for p in _role_pods(c, "decode"):
        _, body = _get(f"http://{p['status']['podIP']}:{launch.DEFAULT_METRICS_PORT}/metrics")
        for line in body.decode().splitlines():
            if line.startswith("baton_kv_transfer_bytes_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_kv_handoffs_are_authenticated(tiny_fleet):
    """The fleet's KV transfers happen (bytes on the decode side) and a peer with the wrong secret is refused."""
    import asyncio

    from baton.worker.kv.base import KVTransferFailed
    from baton.worker.kv.tcp import TCPKVTransport

    c = tiny_fleet
    router_ip = cluster_ip(c, "tiny", FLEET_NS)
    before = _kv_pulled_bytes(c)
    _greedy(f"http://{router_ip}:80/v1")
    assert _kv_pulled_bytes(c) > before, "no KV bytes moved from prefill to decode"
    (prefill,) = _role_pods(c, "prefill")
    wrong = TCPKVTransport("127.0.0.1", 0, bind_host="127.0.0.1", secret="not-the-fleet-secret")
    try:
        with pytest.raises(KVTransferFailed, match="differs"):
            wrong._connect(prefill["status"]["podIP"], 14579)
    finally:
        asyncio.run(wrong.stop())


def test_disruptions_under_load_fail_no_request(tiny_fleet, tiny_model):
    """Under a steady load: a prefill pod deleted, a decode pod deleted, a rolling update of the workers and
    prefill scaled to zero -- zero failed client requests (counts printed)."""
    c = tiny_fleet
    router_ip = cluster_ip(c, "tiny", FLEET_NS)
    report: list[str] = []
    with Load(f"http://{router_ip}:80/v1", threads=3, model_dir=tiny_model) as load:
        def phase(name: str, act, settle, timeout: float = 240) -> None:
            ok0, failed0 = load.counts()
            t0 = time.monotonic()
            act()
            wait_for(f"{name}: the fleet to settle", settle, timeout=timeout, interval=1)
            time.sleep(3)  # traffic on the settled fleet too
            ok1, failed1 = load.counts()
            report.append(f"{name}: {ok1 - ok0} ok, {failed1 - failed0} failed, settled in "
                          f"{time.monotonic() - t0:.1f}s")

        wait_for("the load to get going", lambda: load.counts()[0] >= 10, timeout=60)
        (old_prefill,) = _role_pods(c, "prefill")
        phase("delete a prefill pod",
              lambda: _k(c, "delete", "pod", "-n", FLEET_NS, old_prefill["metadata"]["name"], "--wait=false"),
              lambda: _settled(c, "prefill", 1, {old_prefill["metadata"]["name"]}))
        (old_decode,) = _role_pods(c, "decode")
        phase("delete a decode pod",
              lambda: _k(c, "delete", "pod", "-n", FLEET_NS, old_decode["metadata"]["name"], "--wait=false"),
              lambda: _settled(c, "decode", 1, {old_decode["metadata"]["name"]}))
        before = {r: {p["metadata"]["name"] for p in _role_pods(c, r)} for r in ("prefill", "decode")}
        phase("rolling update of the workers (engine args)",
              lambda: _k(c, "patch", "llmservice", "tiny", "-n", FLEET_NS, "--type=merge", "-p",
                         json.dumps({"spec": {"engine": {"args": ["--max-num-seqs", "16"]}}})),
              lambda: _settled(c, "prefill", 1, before["prefill"]) and _settled(c, "decode", 1, before["decode"]),
              timeout=300)
        phase("scale prefill to zero",
              lambda: _k(c, "patch", "llmservice", "tiny", "-n", FLEET_NS, "--type=merge", "-p",
                         json.dumps({"spec": {"prefill": {"replicas": 0}}})),
              lambda: not _pods(c, "baton.dev/role=prefill", FLEET_NS))
    ok, failed = load.counts()
    summary = "\n".join(report) + f"\ntotal: {ok} ok ({load.empty_ok} empty, as the colocated answer), {failed} failed"
    print(summary, file=sys.stderr)
    REPORT_LINES.extend(f"disruptions under load: {line}" for line in summary.splitlines())
    assert ok > 50, summary
    assert failed == 0, (summary + "\nfirst failures:\n" + "\n".join(load.failed[:10]) + "\n"
                         + _router_evidence(c, "tiny"))


def _metric_sum(body: bytes, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name) and not line.startswith("#"))


def host_prometheus(c, tmp_path: Path):
    """A real Prometheus on the host, started, that finds the cluster's pods through the apiserver and scrapes each
    on the port the chart's PodMonitor would (`KubernetesPods`), every 2 s -- with the `tiny` LLMService deleted
    first: its CPU is for the test's own fleet."""
    from baton.e2e.prometheus import KubernetesPods, LocalPrometheus
    from baton.e2e.realnode import host_ip

    _k(c, "delete", "llmservice", "tiny", "-n", FLEET_NS, "--wait=false", check=False)
    prom = LocalPrometheus(tmp_path / "prometheus", listen=host_ip(), scrape_interval="2s",
                           kubernetes=KubernetesPods(c.api_client, tmp_path / "prometheus" / "pods.json"))
    prom.start()
    return prom


def test_autoscaler_scales_decode_from_a_real_prometheus(real_cluster, fleet_ns, tiny_model, tmp_path):
    """A real Prometheus on the host finds the real pods through the apiserver and scrapes them; the operator's
    autoscaler (in its pod) reads it, sees a TPOT SLO broken under load, and scales decode up; the new decode
    pod becomes Ready and takes traffic -- with no failed request meanwhile."""
    import yaml

    c = real_cluster
    prom = host_prometheus(c, tmp_path)
    try:
        body = _fleet_manifest(c.worker_ref, tiny_model)
        body["metadata"]["name"] = "auto"
        body["spec"]["slo"] = {"ttft": "30s", "tpot": "1ms"}  # every decode step breaks this TPOT SLO
        body["spec"]["decode"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}
        body["spec"]["prefill"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 1}
        body["spec"]["autoscaling"] = {"enabled": True, "prometheusURL": prom.url, "interval": "3s"}
        _k(c, "apply", "-f", "-", input=yaml.safe_dump(body))
        wait_for("LLMService auto Ready, its router seeing its prefill and decode workers",
                 lambda: _condition(c, "auto", "Ready").get("phase") == "Ready" and router_sees(c, "auto"),
                 timeout=300, interval=2)
        router_ip = cluster_ip(c, "auto", FLEET_NS)
        (first,) = _pods(c, "app.kubernetes.io/instance=auto,baton.dev/role=decode", FLEET_NS)
        t0 = time.monotonic()
        with Load(f"http://{router_ip}:80/v1", threads=2, model_dir=tiny_model) as load:
            def scraped() -> bool:
                return bool(prom.query('baton_router_tpot_seconds_count{llmservice="auto"}')) and bool(
                    prom.query('vllm:generation_tokens_total{llmservice="auto",role="decode"}'))

            wait_for("Prometheus to scrape the router and the decode pod (found through the apiserver)", scraped,
                  timeout=120, interval=2)
            second = wait_for("the autoscaler to add a Ready decode pod", lambda: [
                p for p in _pods(c, "app.kubernetes.io/instance=auto,baton.dev/role=decode", FLEET_NS)
                if p["metadata"]["name"] != first["metadata"]["name"] and _ready(p)
                and not p["metadata"].get("deletionTimestamp")], timeout=240, interval=2)[0]
            PHASE_TIMINGS["autoscaler: load start -> second decode pod Ready"] = time.monotonic() - t0
            ip = second["status"]["podIP"]
            before = _metric_sum(_get(f"http://{ip}:8000/metrics")[1], "vllm:generation_tokens_total")
            wait_for("the new decode pod to take traffic", lambda: _metric_sum(
                _get(f"http://{ip}:8000/metrics")[1], "vllm:generation_tokens_total") > before + 10, timeout=60)
        status = llmservice(c, "auto", FLEET_NS)["status"]
        assert status["decode"]["desiredReplicas"] == 2, status
        ok, failed = load.counts()
        REPORT_LINES.append(f"autoscaling under load: {ok} ok, {failed} failed; decode 1 -> 2 "
                            f"({status['decode'].get('lastScaleReason', '')})")
        assert failed == 0, (load.failed[:5], load.failed[-1:], _router_evidence(c, "auto"))
    finally:
        prom.stop()
        _k(c, "delete", "llmservice", "auto", "-n", FLEET_NS, "--wait=false", check=False)


def _router_evidence(c, instance: str) -> str:
    """What the router of `instance` says about its hops (failures by reason, prefill-failure outcomes) and the
    end of its log: read when a load test counted failures, so the cause is in the CI log."""
    lines = []
    for p in _pods(c, f"app.kubernetes.io/instance={instance},baton.dev/role=router", FLEET_NS):
        name = p["metadata"]["name"]
        for cs in p["status"].get("containerStatuses", []):  # a restarted router resets its counters
            lines.append(f"router pod {name}: ready {cs.get('ready')}, {cs.get('restartCount', 0)} restarts, "
                         f"last state {json.dumps(cs.get('lastState') or {})}")
        events = _k(c, "get", "events", "-n", FLEET_NS, "--field-selector", f"involvedObject.name={name}",
                    "-o", "custom-columns=T:.lastTimestamp,R:.reason,N:.count,M:.message", "--no-headers",
                    check=False).stdout.splitlines()
        lines += [f"  event: {e}" for e in events[-20:]]
        previous = _k(c, "logs", "-n", FLEET_NS, name, "--previous", "--tail=40", check=False).stdout
        lines += [f"  previous container: {x}" for x in previous.splitlines()]
        _, body = _get(f"http://{p['status'].get('podIP')}:{launch.DEFAULT_METRICS_PORT}/metrics")
        lines += [x for x in body.decode(errors="replace").splitlines()
                  if x.startswith(("baton_router_hop_errors_total", "baton_router_prefill_failures_total",
                                   "baton_router_requests_total"))]
        log = _k(c, "logs", "-n", FLEET_NS, name, check=False).stdout.splitlines()
        # what the router thought of its workers and hops (health changes, missed checks, failed hops)
        lines += [x for x in log if any(w in x for w in ("unhealthy", "missed a check", "is healthy", "failed",
                                                            "recomput", "503", "gone"))][-80:]
    return "\n".join(lines)


MODEL_TOKEN = "model-server-token"
SMOLLM2 = smollm2.NAME  # the served name and the folder the model server serves


@pytest.fixture
def model_server(tiny_model, smollm2_model, tmp_path):
    """An https server on the host's address (what pods reach), serving the tiny model's and SmolLM2's folders
    under /models/NAME/ and, behind a bearer token, under /private/models/NAME/."""
    from baton.e2e.realnode import host_ip

    ip = host_ip()
    cert, key = self_signed_cert(tmp_path, ip)
    pem = cert.read_text()

    def answer(path: str, authorization: str | None) -> tuple[int, bytes]:
        if path.startswith("/private/"):
            if authorization != f"Bearer {MODEL_TOKEN}":
                return 401, b"unauthorized"
            path = path.removeprefix("/private")
        for folder in (tiny_model, smollm2_model):
            prefix = f"/models/{folder.name}/"
            f = folder / path.removeprefix(prefix)
            if path.startswith(prefix) and "/" not in path.removeprefix(prefix) and f.is_file():
                return 200, f.read_bytes()
        return 404, b"not found"

    with https_server(ip, answer, cert, key) as base:
        yield {"base": base, "ca": pem}


def _condition(c, name: str, type_: str) -> dict:
    obj = llmservice(c, name, FLEET_NS)
    if obj is None:
        return {}
    status = obj.get("status") or {}
    return next((x for x in status.get("conditions", []) if x["type"] == type_), {}) | {"phase": status.get("phase")}


def test_uri_model_source_end_to_end_and_clear_failures(real_cluster, fleet_ns, model_server):
    """`uri` + `secretRef`: the init container (`baton model fetch`, in the worker image) downloads the model
    over https with a bearer token and a private CA into the node model cache; a 404 and a refused token become
    ModelReady=False with the fetcher's own message and phase Failed -- never a silent crash loop ('refused' names
    the same URI: a cached entry is no way around its Secret). Then a second decode pod on the same node reuses
    the cache entry without downloading (`_node_cache_is_reused_by_a_second_pod`)."""
    import yaml

    c = real_cluster
    _k(c, "delete", "llmservice", "tiny", "-n", FLEET_NS, "--wait=false", check=False)  # CPU for these pods
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "model-creds", "namespace": FLEET_NS},
              "stringData": {"BATON_MODEL_TOKEN": MODEL_TOKEN, "BATON_MODEL_CA": model_server["ca"]}}
    wrong = {**secret, "metadata": {"name": "wrong-creds", "namespace": FLEET_NS},
             "stringData": {"BATON_MODEL_TOKEN": "not-the-token", "BATON_MODEL_CA": model_server["ca"]}}
    _k(c, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, wrong]}))

    def service(name: str, path: str, creds: str, serving: bool) -> dict:
        body = _fleet_manifest(c.worker_ref, Path("/unused"))
        body["metadata"]["name"] = name
        body["spec"]["model"]["name"] = SMOLLM2
        body["spec"]["model"]["source"] = {"uri": f"{model_server['base']}{path}", "secretRef": {"name": creds}}
        body["spec"]["model"]["cache"] = {"size": "1Gi"}  # the node cache (default mode): SmolLM2 is 517 MiB
        for role in ("prefill", "decode"):  # the real model's weights: 540 MB in float32
            body["spec"][role]["resources"]["limits"]["memory"] = "2Gi"
            body["spec"][role]["resources"]["requests"]["memory"] = "1Gi"
        if not serving:  # only a decode pod: enough to see the download fail
            body["spec"]["prefill"]["replicas"] = 0
            body["spec"]["router"]["replicas"] = 0
        return body

    services = [service("fetched", f"/private/models/{SMOLLM2}/", "model-creds", True),
                service("missing", "/private/models/no-such-model/", "model-creds", False),
                service("refused", f"/private/models/{SMOLLM2}/", "wrong-creds", False)]
    _k(c, "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(b) for b in services))
    try:
        missing = wait_for("ModelReady=False on 'missing'",
                        lambda: (x := _condition(c, "missing", "ModelReady")).get("status") == "False" and x,
                        timeout=240, interval=2)
        assert "HTTP 404" in missing["message"] and missing["phase"] == "Failed", missing
        refused = wait_for("ModelReady=False on 'refused'",
                        lambda: (x := _condition(c, "refused", "ModelReady")).get("status") == "False" and x,
                        timeout=240, interval=2)
        assert "refused the credentials (HTTP 401)" in refused["message"], refused
        assert "not-the-token" not in json.dumps(refused)
        wait_for("'fetched' Ready", lambda: _condition(c, "fetched", "Ready").get("phase") == "Ready",
              timeout=300, interval=2)
        assert _condition(c, "fetched", "ModelReady")["status"] == "True"
        router_ip = cluster_ip(c, "fetched", FLEET_NS)
        import openai

        r = openai.OpenAI(base_url=f"http://{router_ip}:80/v1", api_key="unused", max_retries=0,
                          timeout=120).chat.completions.create(
            model=SMOLLM2, max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        answer = r.choices[0].message.content
        REPORT_LINES.append(f"SmolLM2 fetched over https into the node cache, served by real pods: {answer!r}")
        assert "Paris" in answer, answer
        _node_cache_is_reused_by_a_second_pod(c)
    finally:
        _k(c, "delete", "llmservice", "fetched", "missing", "refused", "-n", FLEET_NS, "--wait=false", check=False)


def _fetch_seconds(pod: dict) -> float:
    """How long the pod's fetch-model init container ran (its terminated state's timestamps, whole seconds)."""
    from datetime import datetime

    from baton.operator.model_fetch_status import FETCH_CONTAINER

    (status,) = [s for s in pod["status"].get("initContainerStatuses", []) if s["name"] == FETCH_CONTAINER]
    done = status["state"]["terminated"]
    return (datetime.fromisoformat(done["finishedAt"])
            - datetime.fromisoformat(done["startedAt"])).total_seconds()


def _node_cache_is_reused_by_a_second_pod(c) -> None:
    """'fetched' scaled to 2 decode pods, both on real-1 (the decode pool's nodeSelector): the second pod's
    fetch-model init container finds the node cache's complete entry and downloads nothing (its log says so)."""
    from baton.operator.model_fetch_status import FETCH_CONTAINER
    from baton.worker.model_cache import HIT

    _k(c, "delete", "llmservice", "missing", "refused", "-n", FLEET_NS, "--wait=false", check=False)  # their CPU
    selector = "app.kubernetes.io/instance=fetched,baton.dev/role=decode"
    (first,) = [p for p in _pods(c, selector, FLEET_NS) if not p["metadata"].get("deletionTimestamp")]
    t0 = time.monotonic()
    _k(c, "patch", "llmservice", "fetched", "-n", FLEET_NS, "--type=merge", "-p",
       json.dumps({"spec": {"decode": {"replicas": 2}}}))
    second = wait_for("a second Ready decode pod of 'fetched'", lambda: [
        p for p in _pods(c, selector, FLEET_NS)
        if p["metadata"]["name"] != first["metadata"]["name"] and _ready(p)
        and not p["metadata"].get("deletionTimestamp")], timeout=240, interval=2)[0]
    PHASE_TIMINGS["uri: decode 1 -> 2, second pod Ready (node cache)"] = time.monotonic() - t0
    pods = {p["metadata"]["name"]: p for p in _pods(c, selector, FLEET_NS)}
    first, second = pods[first["metadata"]["name"]], pods[second["metadata"]["name"]]
    assert first["spec"]["nodeName"] == second["spec"]["nodeName"] == "real-1", (
        first["spec"]["nodeName"], second["spec"]["nodeName"])
    said = {}
    for which, p in (("first", first), ("second", second)):
        # the fetch leaves its outcome line in its termination message (the pod's status): this kubelet keeps
        # no log of a finished init container to read with `kubectl logs -c`
        (status,) = [s for s in p["status"].get("initContainerStatuses", []) if s["name"] == FETCH_CONTAINER]
        said[which] = (status["state"].get("terminated") or {}).get("message", "").strip() or str(status)
        seconds = _fetch_seconds(p)
        PHASE_TIMINGS[f"uri: {which} decode pod's fetch-model init container"] = seconds
        REPORT_LINES.append(f"node model cache, {which} decode pod on real-1: fetch-model ran {seconds:.0f}s: "
                            f"{said[which]}")
    assert said["second"].startswith(f"{HIT}: reused") and "no download" in said["second"], said


def test_cluster_down_leaves_nothing(real_cluster):
    """Runs after every other real-node test (e2e/conftest.py moves it last): stop the shared cluster and look
    for anything of ours on the host."""
    rec = real_cluster.record
    assert any(x.startswith("process") for x in hostclean.leftovers(rec))
    for node in real_cluster.real.specs:  # the pods' CPU, which no phase's own count includes
        usage = Path("/sys/fs/cgroup/cpuacct") / real_cluster.real.cgroup_name(node.name) / "cpuacct.usage"
        if usage.exists():
            PHASE_TIMINGS[f"CPU seconds of everything on {node.name} (its cgroup)"] = int(usage.read_text()) / 1e9
    cpu = {name: c.cpu_seconds() for name, c in real_cluster.components.items()}
    REPORT_LINES.append("CPU seconds of the cluster's own processes (the pods' are in their nodes' cgroups): " + ", ".join(
        f"{name} {sec:.0f}" for name, sec in sorted(cpu.items(), key=lambda kv: -(kv[1] or 0)) if sec is not None))
    t0 = time.monotonic()
    real_cluster.stop()
    PHASE_TIMINGS["cluster stop (2 nodes, pods, host clean-up)"] = time.monotonic() - t0
    left = hostclean.leftovers(rec)
    assert left == [], left
    assert hostclean.read_record() is None
