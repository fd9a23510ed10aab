"""Prefill/decode disaggregation through the HTTP API, as the router drives it (vLLM's `kv_transfer_params`
protocol): the prefill hop's response carries the params, the decode hop's response is the whole completion
and equals what a `both` worker answers (greedy). Real engines on the tiny model, in-process KV transport."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")

from .test_server_openai import serve_roles, wait_idle

SERVED = "tiny"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from baton.worker.tiny import create_tiny_model

    model = create_tiny_model(tmp_path_factory.mktemp("tiny-disagg"), size="tiny", arch="llama", seed=0)
    yield from serve_roles(model, SERVED)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_two_hops_equal_one(servers, path):
    body = {"model": SERVED, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "Where do you live?"}]
    else:
        body["prompt"] = "Where do you live?"

    def text(resp: dict) -> str:
        choice = resp["choices"][0]
        return choice["message"]["content"] if "chat" in path else choice["text"]

    whole = httpx.post(servers["both"].base_url + path, json=body, timeout=60).json()
    assert whole["kv_transfer_params"] is None

    p = httpx.post(
        servers["prefill"].base_url + path,
        timeout=60,
        json={**body, "kv_transfer_params": {"do_remote_decode": True}},
        headers={"X-Request-Id": "disagg-1"},
    )
    assert p.status_code == 200, p.text
    kv = p.json()["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True and kv["remote_engine_id"]
    assert p.json()["usage"]["completion_tokens"] == 1

    d = httpx.post(
        servers["decode"].base_url + path,
        json={**body, "kv_transfer_params": kv},
        timeout=60,
        headers={"X-Request-Id": "disagg-1"},
    )  # the router may reuse the id on the other worker
    assert d.status_code == 200, d.text
    assert text(d.json()) == text(whole)
    assert d.json()["usage"] == whole["usage"]
    assert d.json()["id"] == ("chatcmpl-disagg-1" if "chat" in path else "cmpl-disagg-1")


def test_decode_hop_streams_the_whole_completion(servers):
    body = {
        "model": SERVED,
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = httpx.post(servers["both"].base_url + "/v1/completions", json=body, timeout=60).json()
    kv = httpx.post(
        servers["prefill"].base_url + "/v1/completions",
        timeout=60,
        json={**body, "kv_transfer_params": {"do_remote_decode": True}},
    ).json()["kv_transfer_params"]
    client = servers["decode"].client()
    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt=body["prompt"],
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "kv_transfer_params": kv},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_kv_transfer_failure_is_a_502(servers):
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    kv = httpx.post(
        servers["prefill"].base_url + "/v1/completions",
        timeout=60,
        json={**body, "kv_transfer_params": {"do_remote_decode": True}},
    ).json()["kv_transfer_params"]
    kv = {**kv, "remote_engine_id": "no-such-engine"}
    for stream in (False, True):
        r = httpx.post(
            servers["decode"].base_url + "/v1/completions",
            timeout=60,
            json={**body, "stream": stream, "kv_transfer_params": kv},
        )
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "kv_transfer_failed" and err["param"] == "kv_transfer_params"
        assert "no-such-engine" in err["message"]
    wait_idle(servers["decode"].engine)
