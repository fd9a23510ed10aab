"""`baton up`: the pure plan (processes, ports, CPUs, spec handling) and the whole local fleet end to end:
the official openai client through `baton up`'s router equals a colocated worker (greedy), a prefill worker
killed mid-request gives a correct answer or a clean error (never a hang), no KV blocks leak, Ctrl-C/SIGTERM
leave no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from baton.e2e.processes import wait_for, worker_process
from baton.worker.local_fleet import (
    BATON,
    Capabilities,
    assign_cpus,
    free_ports,
    load_spec,
    plan_fleet,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-local.yaml"
CAPS = Capabilities(router=True, kv_transport_flag=True)

SPEC = """\
apiVersion: baton.dev/v1alpha1
kind: LLMService
metadata: {name: demo}
spec:
  model: {name: tiny-llama, source: {hostPath: {path: /nonexistent/tiny}}, maxModelLen: 512}
  engine: {kind: baton, args: ["--max-num-seqs", "8"]}
  prefill: {replicas: 2, extraArgs: ["--kv-blocks", "64"]}
  decode: {replicas: 1}
  router: {policy: round-robin}
"""


def write_spec(tmp_path, text=SPEC):
    p = tmp_path / "svc.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------ pure parts


def test_assign_cpus():
    assert assign_cpus(2, 1, [0, 1]) == ([[0], [1]], False)
    assert assign_cpus(1, 2, [0, 1]) == ([[0, 1]], False)
    assert assign_cpus(3, 1, [4, 6]) == ([[4], [6], [4]], True)
    assert assign_cpus(2, 2, [0, 1, 2]) == ([[0, 1], [0, 2]], True)
    with pytest.raises(ValueError):
        assign_cpus(1, 0, [0])


def test_free_ports_are_distinct():
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_free_ports_lie_below_the_ephemeral_range_and_are_free():
    """Ports for listeners never come from the range outgoing connections take (a released port there was taken
    by a connection before vLLM's NIXL side channel could bind it, in CI)."""
    import socket

    from baton.worker.local_fleet import ephemeral_port_range

    lo, _ = ephemeral_port_range()
    ports = free_ports(50)
    assert all(1024 <= p < lo for p in ports), (lo, sorted(ports))
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_ports_fall_back_to_the_kernel_when_no_range_is_left(monkeypatch):
    from baton.worker import local_fleet

    monkeypatch.setattr(local_fleet, "ephemeral_port_range", lambda: (1024, 65535))
    assert len(set(free_ports(3))) == 3


def test_plan_disaggregated(tmp_path):
    svc = load_spec(write_spec(tmp_path))
    plan = plan_fleet(svc, model_path="/m", caps=CAPS, cpus_per_worker=1, available_cpus=[0, 1])
    assert [p.name for p in plan.procs] == ["prefill-0", "prefill-1", "decode-0", "router"]
    assert not plan.colocated and plan.kv_transport == "tcp" and plan.model_name == "tiny-llama"
    ports = [p.port for p in plan.procs] + [p.kv_port for p in plan.workers]
    assert len(set(ports)) == len(ports)
    p0 = plan.procs[0]
    argv = p0.argv[len(BATON):]
    assert argv[:4] == ["worker", "--role", "prefill", "--model"]
    assert "--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == "tiny-llama"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert argv[argv.index("--kv-transport") + 1] == "tcp"
    assert argv[argv.index("--kv-port") + 1] == str(p0.kv_port)
    assert argv[-4:] == ["--max-num-seqs", "8", "--kv-blocks", "64"]  # engine args, then the role's
    assert "--kv-blocks" not in plan.procs[2].argv  # decode has no extraArgs
    assert [p.cpus for p in plan.workers] == [[0], [1], [0]] and plan.warnings  # 3 workers on 2 cores
    assert all(p.threads == 1 for p in plan.procs)
    router = plan.router.argv[len(BATON):]
    assert router[router.index("--policy") + 1] == "round-robin"
    assert router[router.index("--prefill") + 1] == f"{plan.procs[0].url},{plan.procs[1].url}"
    assert router[router.index("--decode") + 1] == plan.procs[2].url
    assert "--both" not in router
    assert plan.endpoint == f"http://127.0.0.1:{plan.router.port}/v1"


def test_plan_colocated_and_overrides(tmp_path):
    svc = load_spec(write_spec(tmp_path))
    plan = plan_fleet(svc, model_path="/m", caps=CAPS, colocated=True, policy="least-loaded", router_port=9999)
    assert [p.name for p in plan.procs] == ["both-0", "router"]
    assert plan.kv_transport is None and "--kv-transport" not in plan.procs[0].argv
    assert plan.procs[0].cpus is None and plan.procs[0].threads is None
    r = plan.router.argv
    assert r[r.index("--both") + 1] == plan.procs[0].url and r[r.index("--port") + 1] == "9999"
    assert r[r.index("--policy") + 1] == "least-loaded"
    plan = plan_fleet(svc, model_path="/m", caps=CAPS, prefill=1, decode=2)
    assert [p.name for p in plan.workers] == ["prefill-0", "decode-0", "decode-1"]
    plan = plan_fleet(svc, model_path="/m", caps=CAPS, prefill=0)  # no prefill workers: colocated
    assert plan.colocated and [p.role for p in plan.workers] == ["both"]
    with pytest.raises(ValueError, match="at least one decode worker"):
        plan_fleet(svc, model_path="/m", caps=CAPS, decode=0)


def test_plan_without_the_tcp_transport_warns(tmp_path):
    svc = load_spec(write_spec(tmp_path))
    plan = plan_fleet(svc, model_path="/m", caps=Capabilities(router=True, kv_transport_flag=False))
    assert plan.kv_transport is None and "--kv-transport" not in plan.procs[0].argv
    assert any("recompute" in w for w in plan.warnings)
    with pytest.raises(ValueError, match="no `baton router`"):
        plan_fleet(svc, model_path="/m", caps=Capabilities(router=False, kv_transport_flag=True))


def test_capabilities_of_this_installation():
    caps = Capabilities.detect()
    assert caps.router  # `baton router` is part of the worker


def test_load_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_spec(write_spec(tmp_path, "a: [b"))
    with pytest.raises(ValueError, match="has no LLMService"):
        load_spec(write_spec(tmp_path, "kind: ConfigMap\n"))
    bad = SPEC.replace("replicas: 2", "replicas: -1")
    with pytest.raises(ValueError, match=r"spec\.prefill\.replicas"):
        load_spec(write_spec(tmp_path, bad))
    assert load_spec(EXAMPLE).metadata.name == "tiny"


def baton(*args, timeout=120):
    return subprocess.run([*BATON, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_up_errors_are_one_line(tmp_path):
    r = baton("up", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and r.stderr.strip() == f"baton up: error: {tmp_path / 'missing.yaml'} does not exist"
    r = baton("up", str(EXAMPLE), "--model", str(tmp_path))
    assert r.returncode == 1 and "no config.json" in r.stderr and "Traceback" not in r.stderr
    r = baton("up", str(EXAMPLE), "--cpus-per-worker", "0")
    assert r.returncode == 1 and "--cpus-per-worker must be at least 1" in r.stderr


# ------------------------------------------------------------------------------------------ end to end


class Up:
    """`baton up` as a subprocess; stdout/stderr lines collected by threads."""

    def __init__(self, *args: str, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [*BATON, "up", *args, "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream, sink) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            self.out.put(line)

    def wait_endpoint(self, timeout: float = 180) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout:
                m = re.match(r"OpenAI endpoint: (\S+)\s+model: (\S+)", line)
                if m:
                    return m.group(1), m.group(2)
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError("baton up exited:\n" + "\n".join(self.stderr))
            time.sleep(0.1)
        raise AssertionError("no endpoint printed:\n" + "\n".join(self.stderr))

    def fleet(self) -> dict:
        return json.loads((self.run_dir / "fleet.json").read_text())

    def stop(self, sig=signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((name + "{", name + " "))]
    assert values, f"{name} not in {url}/metrics"
    return sum(values)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A colocated `baton worker --role both` on the same model: the expected greedy outputs."""
    with worker_process(tiny_model_dir, served_model_name="tiny-llama") as base:
        yield base + "/v1"


@pytest.fixture
def up(tiny_model_dir, tmp_path):
    runs = []

    def start(*args: str) -> Up:
        u = Up(str(EXAMPLE), "--model", str(tiny_model_dir), *args, run_dir=tmp_path / f"run{len(runs)}")
        runs.append(u)
        return u

    yield start
    for u in runs:
        if u.proc.poll() is None:
            u.stop()


PROMPTS = ["Where do you live?", "Once upon a time there was a small village by the sea,",
           "Kubernetes runs containers in pods."]


@pytest.mark.integration
@pytest.mark.slow
def test_openai_client_through_baton_up_equals_colocated(up, reference):
    openai = pytest.importorskip("openai")
    u = up()
    endpoint, model = u.wait_endpoint()
    assert model == "tiny-llama"
    assert any("curl -s " + endpoint + "/completions" in line for line in u.stdout)
    assert any(line.startswith(f"logs: {u.run_dir}") for line in u.stdout)
    fleet = u.fleet()
    assert [p["role"] for p in fleet["processes"]] == ["prefill", "decode", "router"]
    assert all(Path(p["log"]).is_file() for p in fleet["processes"])
    if fleet["kv_transport"]:  # baton up gives its workers a shared random secret for KV transfers
        assert not any("BATON_KV_SECRET is not set" in Path(p["log"]).read_text() for p in fleet["processes"])

    via_up = openai.OpenAI(base_url=endpoint, api_key="x", max_retries=0, timeout=60)
    colocated = openai.OpenAI(base_url=reference, api_key="x", max_retries=0, timeout=60)
    for prompt in PROMPTS:
        kw = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
        got, want = via_up.completions.create(**kw), colocated.completions.create(**kw)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage.completion_tokens == want.usage.completion_tokens == 12
        stream = via_up.completions.create(**kw, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.choices[0].text
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello! How are you today?"}],
            "max_tokens": 10, "temperature": 0}
    assert (via_up.chat.completions.create(**chat).choices[0].message.content
            == colocated.chat.completions.create(**chat).choices[0].message.content)
    assert [m.id for m in via_up.models.list().data] == ["tiny-llama"]

    # no KV blocks leak: every worker's cache is empty again (prefill leases pulled; without the TCP transport
    # the prefill's unpulled leases only expire after their TTL, so only the decode side is checked then)
    workers = [p for p in fleet["processes"] if p["role"] != "router"]
    check = workers if fleet["kv_transport"] else [p for p in workers if p["role"] != "prefill"]
    for p in check:
        wait_for(f"{p['name']} KV cache empty", lambda p=p: metric(p["url"], "vllm:kv_cache_usage_perc") == 0.0, timeout=15)
        assert metric(p["url"], "vllm:num_requests_running") == 0

    pids = [p["pid"] for p in fleet["processes"]]
    assert u.stop(signal.SIGINT) == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert "baton up: stopped" in u.stderr


PARIS = "What is the capital of France? Answer in one sentence."


@pytest.mark.integration
@pytest.mark.slow
def test_baton_up_by_default_serves_smollm2_disaggregated_and_knows_paris(tmp_path):
    """What `scripts/up` runs on a fresh machine: `baton up` with no spec serves examples/smollm2-local.yaml --
    the real SmolLM2-135M-Instruct (from PyPI, converted once, cached) on a prefill and a decode worker with
    the KV handed over TCP -- and the chat answer through the router, with the official client, is right."""
    openai = pytest.importorskip("openai")
    u = Up(run_dir=tmp_path / "run")
    try:
        endpoint, model = u.wait_endpoint(timeout=600)  # a first run fetches and converts the model
        assert model == "smollm2-135m-instruct"
        assert [p["role"] for p in u.fleet()["processes"]] == ["prefill", "decode", "router"]
        client = openai.OpenAI(base_url=endpoint, api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PARIS}],
                                           max_tokens=40, temperature=0)
        answer = r.choices[0].message.content
        print(f"SmolLM2 through baton up (Baton engine, disaggregated): {answer!r}")
        assert "Paris" in answer, answer
        assert r.choices[0].finish_reason == "stop"
        decode = next(p for p in u.fleet()["processes"] if p["role"] == "decode")
        assert metric(decode["url"], "baton_kv_transfer_bytes_total") > 0  # the prompt's KV came from prefill
    finally:
        u.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_killing_the_prefill_worker_mid_request(up, reference):
    u = up()
    endpoint, model = u.wait_endpoint()
    fleet = u.fleet()
    prefill = next(p for p in fleet["processes"] if p["role"] == "prefill")
    decode = next(p for p in fleet["processes"] if p["role"] == "decode")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "a", "journey", "of",
             "a", "thousand", "miles", "begins", "with", "a", "single", "step"]
    # ~400 tokens each (the example's maxModelLen is 512)
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(180)) for i in range(8)]
    body = {"model": model, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    want = {p: httpx.post(reference + "/completions", json={**body, "prompt": p}, timeout=60).json()
            ["choices"][0]["text"] for p in prompts}

    def one(i: int, prompt: str):
        time.sleep(0.05 * i)
        t0 = time.monotonic()
        try:
            r = httpx.post(endpoint + "/completions", json={**body, "prompt": prompt}, timeout=90)
        except httpx.HTTPError as exc:
            return ("transport", repr(exc), time.monotonic() - t0)
        if r.status_code == 200:
            return ("ok", r.json()["choices"][0]["text"], time.monotonic() - t0)
        return ("error", (r.status_code, r.json()["error"]["message"]), time.monotonic() - t0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, i, p) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 3  # kill it while it works on a request (when the scrape catches one)
        while time.monotonic() < deadline:
            if metric(prefill["url"], "vllm:num_requests_running") + metric(
                    prefill["url"], "vllm:num_requests_waiting") > 0:
                break
        os.kill(prefill["pid"], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]  # never a hang
    for prompt, (kind, value, took) in zip(prompts, results):
        assert took < 60, f"request took {took:.1f}s"
        if kind == "ok":
            assert value == want[prompt]  # a correct answer (the decode worker recomputed the prompt)
        else:  # or a clean, OpenAI-shaped error: a 5xx, not a 4xx blaming the client
            assert kind == "error" and value[0] >= 500, (kind, value)
    assert sum(kind == "ok" for kind, _, _ in results) >= 1

    # the fleet reports the death (nothing restarted silently) and keeps serving through the decode worker
    wait_for("the exit report", lambda: any("prefill-0 exited with signal 9" in line for line in u.stderr), timeout=10)
    assert u.proc.poll() is None
    r = httpx.post(endpoint + "/completions", json={**body, "prompt": prompts[0]}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[prompts[0]]
    wait_for("decode KV cache empty", lambda: metric(decode["url"], "vllm:kv_cache_usage_perc") == 0.0, timeout=15)
    assert metric(decode["url"], "vllm:num_requests_running") == 0

    pids = [p["pid"] for p in fleet["processes"]]
    assert u.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(pid) for pid in pids)


@pytest.mark.integration
@pytest.mark.slow
def test_colocated_with_pinned_cpus_and_no_orphans_when_killed(up):
    u = up("--colocated", "--cpus-per-worker", "1")
    endpoint, model = u.wait_endpoint()
    fleet = u.fleet()
    assert [p["role"] for p in fleet["processes"]] == ["both", "router"]
    worker = fleet["processes"][0]
    assert os.sched_getaffinity(worker["pid"]) == set(worker["cpus"]) and len(worker["cpus"]) == 1
    r = httpx.post(endpoint + "/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    # the supervisor dies without cleaning up: its children still go (PR_SET_PDEATHSIG)
    pids = [p["pid"] for p in fleet["processes"]]
    os.kill(u.proc.pid, signal.SIGKILL)
    u.proc.wait(timeout=10)
    wait_for("the children to exit", lambda: not any(pid_alive(pid) for pid in pids), timeout=30)
