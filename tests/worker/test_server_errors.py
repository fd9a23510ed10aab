"""Pure-logic tests of the HTTP API's error mapping and readiness, with a tiny scripted engine.

Everything about real generation (OpenAI client, streaming, metrics moving, disconnects) is tested against the
real engine in test_server_openai.py; here only what needs a failure on demand.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from baton.worker.engine.types import (
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    InvalidRequest,
    KVTransferFailed,
    StepOutput,
)
from baton.worker.server import create_app
from starlette.testclient import TestClient


class _Tokenizer:
    eos_token_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, token_ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


class ScriptedEngine:
    """Raises `error` at the first output (or after `error_after` outputs); otherwise answers "ok"."""

    role = "both"
    model_name = "/models/fake"
    max_model_len = 32
    tokenizer = _Tokenizer()

    def __init__(self, error: BaseException | None = None, error_after: int = 0) -> None:
        self.error = error
        self.error_after = error_after
        self.started = asyncio.Event()
        self.requests: list[GenerationRequest] = []
        self.hold_start = False

    async def start(self) -> None:
        while self.hold_start:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        pass

    def generate(self, request: GenerationRequest):
        self.requests.append(request)
        return self._gen(request)

    async def _gen(self, request: GenerationRequest):
        n = len(request.prompt_token_ids)
        for i in range(self.error_after):
            yield StepOutput(request.request_id, [111], "o", num_prompt_tokens=n, num_generated_tokens=i + 1)
        if self.error is not None:
            raise self.error
        yield StepOutput(request.request_id, [107], "k", True, "stop", n, self.error_after + 1)

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats()


def client_for(engine: ScriptedEngine) -> TestClient:
    app = create_app(engine, served_model_name="fake", labels={"llmservice": "s", "namespace": "n"})
    return TestClient(app, raise_server_exceptions=False)


def wait_ready(c: TestClient) -> None:
    deadline = time.monotonic() + 5
    while c.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.01)


def post(c: TestClient, path: str = "/v1/completions", **body):
    body.setdefault("model", "fake")
    if path.endswith("/completions") and "chat" not in path:
        body.setdefault("prompt", "hi")
    else:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return c.post(path, json=body)


def assert_error(resp, status: int, type_: str, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert err["param"] == param
    assert err["code"] == code
    assert "Traceback" not in resp.text
    return err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_engine_errors_map_to_http(path, stream):
    cases = [
        (EngineOverloaded("queue full"), 503, "service_unavailable_error", None, "engine_overloaded"),
        (KVTransferFailed("peer gone"), 502, "kv_transfer_error", "kv_transfer_params", "kv_transfer_failed"),
        (InvalidRequest("too many stop strings", param="stop"), 400, "invalid_request_error", "stop", None),
    ]
    for error, status, type_, param, code in cases:
        with client_for(ScriptedEngine(error)) as c:
            wait_ready(c)
            resp = post(c, path, stream=stream)
            err = assert_error(resp, status, type_, param, code)
            assert str(error) in err["message"]
            if status == 503:
                assert resp.headers["retry-after"] == "1"


def test_unexpected_engine_failure_is_a_500_without_traceback():
    with client_for(ScriptedEngine(RuntimeError("secret internals"))) as c:
        wait_ready(c)
        resp = c.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "r-9"})
        err = assert_error(resp, 500, "internal_server_error")
        assert "secret" not in resp.text
        assert "r-9" in err["message"]


def test_error_after_streaming_started_is_reported_in_band():
    with client_for(ScriptedEngine(KVTransferFailed("lease expired"), error_after=2)) as c:
        wait_ready(c)
        resp = post(c, stream=True)
        assert resp.status_code == 200
        events = [line for line in resp.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: ") :])
        assert last["error"]["code"] == "kv_transfer_failed"
        assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["o", "o"]


def test_model_not_found_bad_json_and_unknown_routes():
    with client_for(ScriptedEngine()) as c:
        wait_ready(c)
        err = assert_error(post(c, model="gpt-4"), 404, "invalid_request_error", "model", "model_not_found")
        assert "gpt-4" in err["message"] and "fake" in err["message"]
        # The engine's own name (e.g. the model path) is accepted too, as is leaving `model` out.
        assert post(c, model="/models/fake").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 200

        resp = c.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
        assert "not valid JSON" in assert_error(resp, 400, "invalid_request_error")["message"]
        err = assert_error(post(c, temperature=9), 400, "invalid_request_error", "temperature")
        assert err["message"].startswith("temperature: ")
        assert_error(post(c, "/v1/chat/completions", messages=[]), 400, "invalid_request_error", "messages")
        assert_error(c.get("/v1/nothing"), 404, "not_found_error")
        assert_error(c.get("/v1/completions"), 405, "invalid_request_error")


def test_context_length_checks():
    with client_for(ScriptedEngine()) as c:
        wait_ready(c)
        err = assert_error(
            post(c, prompt="x" * 40), 400, "invalid_request_error", "prompt", "context_length_exceeded"
        )
        assert "maximum context length is 32" in err["message"]
        err = assert_error(
            post(c, prompt="x" * 10, max_tokens=30),
            400,
            "invalid_request_error",
            "max_tokens",
            "context_length_exceeded",
        )
        assert "40 tokens (10 in the prompt, 30 in the completion)" in err["message"]
        assert_error(
            post(c, "/v1/chat/completions", max_completion_tokens=40),
            400,
            "invalid_request_error",
            "max_completion_tokens",
            "context_length_exceeded",
        )


def test_request_ids_and_default_max_tokens():
    engine = ScriptedEngine()
    with client_for(engine) as c:
        wait_ready(c)
        resp = c.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "abc"})
        assert resp.json()["id"] == "cmpl-abc"
        assert resp.headers["x-request-id"] == "abc"
        resp = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hey"}]},
            headers={"X-Request-Id": "chatcmpl-7"},
        )
        assert resp.json()["id"] == "chatcmpl-7"
        resp = c.post("/v1/completions", json={"prompt": "hi"})
        assert resp.json()["id"].startswith("cmpl-") and resp.headers["x-request-id"] == resp.json()["id"]
    assert [r.request_id for r in engine.requests[:2]] == ["abc", "chatcmpl-7"]
    assert engine.requests[0].sampling.max_tokens == 16  # completions: OpenAI's default
    assert engine.requests[1].sampling.max_tokens == 32 - 3  # chat: the rest of the context, as vLLM


def test_not_ready_until_the_engine_started():
    engine = ScriptedEngine()
    engine.hold_start = True
    with client_for(engine) as c:
        assert c.get("/health").status_code == 200  # alive while loading
        assert_error(c.get("/ready"), 503, "service_unavailable_error", code="not_ready")
        resp = post(c)
        assert_error(resp, 503, "service_unavailable_error", code="engine_not_ready")
        assert resp.headers["retry-after"] == "1"
        engine.hold_start = False
        wait_ready(c)
        assert post(c).status_code == 200


def test_engine_that_fails_to_start_is_not_alive():
    engine = ScriptedEngine()

    async def broken_start() -> None:
        raise RuntimeError("out of memory")

    engine.start = broken_start  # type: ignore[method-assign]
    with client_for(engine) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        err = assert_error(c.get("/health"), 503, "service_unavailable_error", code="engine_dead")
        assert "out of memory" in err["message"]
        assert c.get("/ready").status_code == 503


def test_dead_engine_loop_fails_liveness():
    engine = ScriptedEngine()
    with client_for(engine) as c:
        wait_ready(c)
        engine.loop_error = RuntimeError("CUDA error")  # what BatonEngine records when its loop dies
        err = assert_error(c.get("/health"), 503, "service_unavailable_error", code="engine_dead")
        assert "CUDA error" in err["message"]
        assert c.get("/ready").status_code == 503
