"""The worker's HTTP API end to end: the REAL Baton engine on the tiny model, served by uvicorn on a free
loopback port, driven by the official `openai` client (and httpx where the client hides what we check)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from baton.worker.local_fleet import free_port

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

SERVED = "tiny-llama"
LABELS = {"llmservice": "chat", "namespace": "ml"}


# ---------------------------------------------------------------------------------------------- fixtures


def make_engine(model_dir: Path, role: str = "both", **kwargs):
    """The real Baton engine, not started (the app starts it)."""
    from baton.worker.engine.engine import BatonEngine

    return BatonEngine.from_pretrained(str(model_dir), role=role, **kwargs)


def serve_roles(model_dir: Path, served: str, roles: dict[str, str] | None = None, labelled: bool = True):
    """Real engines behind in-process servers, one per `{name: role}` (default both, prefill, decode), each
    Ready; yields them by name and stops them all afterwards -- a module fixture's `yield from`."""
    from baton.worker.server import create_app

    running: dict[str, RunningServer] = {}
    try:
        for name, role in (roles or {r: r for r in ("both", "prefill", "decode")}).items():
            engine = make_engine(model_dir, role=role)
            labels = {"labels": {"role": role}} if labelled else {}
            srv = RunningServer(create_app(engine, served_model_name=served, **labels), engine)
            srv.start()
            running[name] = srv
        yield running
    finally:
        for srv in running.values():
            srv.stop()


class RunningServer:
    """uvicorn in a background thread, so tests can also look at the engine object directly."""

    def __init__(self, app, engine) -> None:
        import uvicorn

        self.engine = engine
        self.app = app
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    def start(self, ready_timeout: float = 120) -> None:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during startup")
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.base_url} never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in LABEL_KEYS))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


LABEL_KEYS = {"model_name", "llmservice", "namespace", "role"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    create_tiny_model(path, size="tiny", arch="llama", seed=0)
    return path


@pytest.fixture(scope="module")
def server(tiny_model):
    from baton.worker.server import create_app

    engine = make_engine(tiny_model)
    app = create_app(engine, served_model_name=SERVED, labels=LABELS)
    srv = RunningServer(app, engine)
    srv.start()
    yield srv
    srv.stop()


def wait_idle(engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {s}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------- tests


def test_models_health_ready(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [SERVED]
    assert httpx.get(server.base_url + "/health").status_code == 200
    ready = httpx.get(server.base_url + "/ready").json()
    assert ready["status"] == "ready"
    assert ready["kv_fingerprint"] == server.engine.kv_fingerprint  # the router pairs workers by it


def test_completion_non_streaming_and_streaming(server):
    client = server.client()
    resp = client.completions.create(
        model=SERVED,
        prompt="The quick brown fox",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.model == SERVED
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8

    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt="The quick brown fox",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text  # greedy: streaming == non-streaming
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    wait_idle(server.engine)


def test_completion_with_token_ids_and_stop(server):
    client = server.client()
    ids = server.engine.tokenizer.encode("Hello! How are you today?")
    by_ids = client.completions.create(
        model=SERVED, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    by_text = client.completions.create(
        model=SERVED,
        prompt="Hello! How are you today?",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    full = by_text.choices[0].text
    if len(full.strip()) >= 2:  # stop on a piece of what greedy decoding produces: the text ends before it
        stop = full.strip()[1:3] if len(full.strip()) >= 3 else full.strip()[1:]
        stopped = client.completions.create(
            model=SERVED,
            prompt="Hello! How are you today?",
            max_tokens=6,
            temperature=0,
            stop=[stop],
            extra_body={"ignore_eos": True},
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stop not in stopped.choices[0].text
        assert full.startswith(stopped.choices[0].text)


def test_chat_non_streaming_and_streaming(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is your name?"}]
    resp = client.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_completion_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 7

    stream = client.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=7,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # no usage chunk unless asked for
    wait_idle(server.engine)


def test_sse_wire_format(server):
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"X-Request-Id": "wire-1"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "wire-1"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {")
        assert json.loads(e[6:])["id"] == "chatcmpl-wire-1"


def test_metrics_move(server):
    before = server.metrics()
    names = {name for name, _ in before}
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "baton_worker_info",
    ):
        assert name in names, name
    text = httpx.get(server.base_url + "/metrics").text
    assert f'model_name="{SERVED}"' in text and 'llmservice="chat"' in text and 'namespace="ml"' in text
    assert 'role="both"' in text

    server.client().completions.create(
        model=SERVED, prompt="Once upon a time", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = server.metrics()

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:prompt_tokens_total") > 0
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") >= 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert after[("vllm:num_requests_running", ())] == 0


def test_bad_requests_are_400_with_openai_bodies(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED, prompt="hi", n=2, best_of=3)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "best_of"
    assert info.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    assert info.value.body["param"] == "temperature"
    assert "temperature" in info.value.body["message"]

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED, prompt="hi " * 5000, max_tokens=1)
    assert info.value.body["param"] == "prompt"
    assert info.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi")
    assert info.value.body["code"] == "model_not_found"

    r = httpx.post(
        server.base_url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def _abort_count(server) -> float:
    return server.metrics().get(("vllm:request_success_total", (("finished_reason", "abort"),)), 0.0)


def test_client_disconnect_mid_stream_aborts(server):
    engine = server.engine
    wait_idle(engine)
    aborted_before = _abort_count(server)
    prompt_len = len(engine.tokenizer.encode("Tell me a long story"))
    body = {
        "model": SERVED,
        "prompt": "Tell me a long story",
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
        "max_tokens": engine.max_model_len - prompt_len,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.base_url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert engine.stats().num_running + engine.stats().num_waiting >= 1
        # leaving the block closes the connection mid-stream
    wait_idle(engine)
    deadline = time.monotonic() + 10
    while _abort_count(server) < aborted_before + 1:
        assert time.monotonic() < deadline, "the disconnect was not counted as an abort"
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    if stats.num_blocks_total:
        assert stats.num_blocks_free == stats.num_blocks_total  # the aborted request's KV blocks came back


def test_client_disconnect_before_first_token_of_non_streaming_request_aborts(server):
    engine = server.engine
    wait_idle(engine)
    prompt_len = len(engine.tokenizer.encode("Tell me a long story"))
    body = {
        "model": SERVED,
        "prompt": "Tell me a long story",
        "temperature": 0,
        "ignore_eos": True,
        "max_tokens": engine.max_model_len - prompt_len,
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(0.3))
    wait_idle(engine, timeout=15)


def test_concurrent_requests(server):
    import concurrent.futures

    client = server.client()

    def one(i: int) -> str:
        return (
            client.completions.create(
                model=SERVED,
                prompt=f"Count {i}:",
                max_tokens=6,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(8)))
    assert texts[0] == one(0)  # batched greedy == alone
    wait_idle(server.engine)
