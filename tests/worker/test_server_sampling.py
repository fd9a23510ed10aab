"""Sampling API parity over HTTP with the official `openai` client: logprobs (completions and chat, streaming and
not), `n` choices, penalties and min_tokens -- on a colocated (`both`) worker and through the two disaggregated
hops (prefill -> decode with `kv_transfer_params`), and refusals (400 naming the field) for what is left out.
Real engines on the tiny model, in-process KV transport."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

from .test_router import RunningRouter, outcome, settled
from .test_server_openai import serve_roles, wait_idle

SERVED = "tiny"
PROMPT = "Where do you live? I live in a small house by the"
MESSAGES = [{"role": "user", "content": "Where do you live?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from baton.worker.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-sampling"), size="tiny", arch="llama", seed=0)


@pytest.fixture(scope="module")
def servers(model_dir):
    yield from serve_roles(model_dir, SERVED)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def raw_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def two_hops(servers, path: str, body: dict) -> httpx.Response:
    """What the router does: prefill hop (max_tokens 1, min_tokens dropped), then the decode hop with its params."""
    hop = {**body, "stream": False, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    hop.pop("min_tokens", None)
    p = httpx.post(servers["prefill"].base_url + path, json=hop, timeout=60)
    assert p.status_code == 200, p.text
    kv = p.json()["kv_transfer_params"]
    assert kv and kv["do_remote_prefill"]
    return httpx.post(servers["decode"].base_url + path, json={**body, "kv_transfer_params": kv}, timeout=60)


def assert_close(a, b, path: str = "") -> None:
    """Equal, floats within 1e-4 (a prompt whose KV came from the prefix cache was computed in another batch
    shape, which moves logprobs in the 7th digit)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def sse(resp: httpx.Response) -> list[dict]:
    import json

    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------------------------------------ logprobs


def test_completion_logprobs_are_the_models_raw_logprobs(servers, hf):
    client = servers["both"].client()
    tok = servers["both"].engine.tokenizer
    resp = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    prompt = tok.encode(PROMPT)
    ids = tok.encode(PROMPT + resp.choices[0].text, add_special_tokens=True)[len(prompt):]  # for the count only
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert len(ids) >= 1
    # the engine's own ids: token texts in order, decoded one by one
    out: list[int] = []
    offset = 0
    for t in range(6):
        ref = raw_logprobs(hf, prompt + out)
        top_v, top_i = ref.topk(3)
        chosen = int(top_i[0])  # greedy
        assert lp.tokens[t] == tok.decode([chosen], skip_special_tokens=False)
        assert lp.token_logprobs[t] == pytest.approx(ref[chosen].item(), abs=1e-4)
        want_top = {tok.decode([int(i)], skip_special_tokens=False): v for i, v in zip(top_i, top_v.tolist())}
        assert lp.top_logprobs[t].keys() == want_top.keys()
        assert list(lp.top_logprobs[t].values()) == pytest.approx(list(want_top.values()), abs=1e-4)
        assert lp.text_offset[t] == offset
        offset += len(lp.tokens[t])
        out.append(chosen)
    assert "".join(lp.tokens) == resp.choices[0].text

    # streaming: the chunks' logprobs put together are the same
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert list(chain.from_iterable(s.tokens for s in streamed)) == lp.tokens
    # (approx: a second run may reuse the prompt's cached KV, computed in another batch shape)
    assert list(chain.from_iterable(s.token_logprobs for s in streamed)) == pytest.approx(lp.token_logprobs,
                                                                                          abs=1e-4)
    assert list(chain.from_iterable(s.text_offset for s in streamed)) == lp.text_offset
    top = list(chain.from_iterable(s.top_logprobs for s in streamed))
    assert [t.keys() for t in top] == [t.keys() for t in lp.top_logprobs]
    assert [v for t in top for v in t.values()] == pytest.approx(
        [v for t in lp.top_logprobs for v in t.values()], abs=1e-4)

    # without logprobs: null, as before
    plain = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].text == resp.choices[0].text


def test_chat_logprobs_format_and_values(servers, hf):
    client = servers["both"].client()
    tok = servers["both"].engine.tokenizer
    resp = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    prompt = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    out: list[int] = []
    for item in content:
        ref = raw_logprobs(hf, prompt + out)
        top_v, top_i = ref.topk(2)
        chosen = int(top_i[0])
        assert item.token == tok.decode([chosen], skip_special_tokens=False)
        assert item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(ref[chosen].item(), abs=1e-4)
        assert [t.token for t in item.top_logprobs] == [tok.decode([int(i)], skip_special_tokens=False) for i in top_i]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top_v.tolist(), abs=1e-4)
        out.append(chosen)
    # streaming
    chunks = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(s.token, s.bytes, [t.token for t in s.top_logprobs]) for s in streamed] == \
        [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content]
    assert [s.logprob for s in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    # logprobs: true alone: the sampled token, no alternatives
    only = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2, temperature=0,
                                          logprobs=True)
    assert [c.top_logprobs for c in only.choices[0].logprobs.content] == [[], []]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logprobs_through_two_hops_equal_one(servers, path, stream):
    body = {"model": SERVED, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": stream}
    if "chat" in path:
        body.update(messages=MESSAGES, logprobs=True, top_logprobs=3)
    else:
        body.update(prompt=PROMPT, logprobs=3)

    def logprobs(resp: httpx.Response):
        assert resp.status_code == 200, resp.text
        if not stream:
            return resp.json()["choices"][0]["logprobs"]
        parts = [c["choices"][0]["logprobs"] for c in sse(resp) if c.get("choices") and c["choices"][0]["logprobs"]]
        if "chat" in path:
            return {"content": list(chain.from_iterable(p["content"] for p in parts))}
        return {k: list(chain.from_iterable(p[k] for p in parts)) for k in ("tokens", "token_logprobs", "top_logprobs")}

    whole = logprobs(httpx.post(servers["both"].base_url + path, json=body, timeout=60))
    split = logprobs(two_hops(servers, path, body))
    if "chat" not in path and not stream:
        whole.pop("text_offset"), split.pop("text_offset")
    assert_close(split, whole)
    assert len(split["content"] if "chat" in path else split["tokens"]) == 6


def test_decode_hop_without_first_token_logprobs_is_a_kv_failure(servers):
    """The router answers a 502 kv_transfer_failed by recomputing on the decode worker: never a wrong answer."""
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    kv = httpx.post(servers["prefill"].base_url + "/v1/completions", timeout=60,
                    json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
                    ).json()["kv_transfer_params"]
    assert kv["first_token_logprobs"][0]["token_id"] == kv["first_token_ids"][0]
    kv.pop("first_token_logprobs")
    r = httpx.post(servers["decode"].base_url + "/v1/completions", json={**body, "kv_transfer_params": kv},
                   timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "kv_transfer_failed", r.text
    assert "first_token_logprobs" in r.json()["error"]["message"]
    wait_idle(servers["decode"].engine)


# ------------------------------------------------------------------------------------------------ penalties


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_penalties_through_two_hops_equal_one(servers, path):
    body = {"model": SERVED, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "repetition_penalty": 2.0,
            "frequency_penalty": 1.5, "presence_penalty": 0.5}
    if "chat" in path:
        body["messages"] = MESSAGES
    else:
        body["prompt"] = PROMPT

    def text(resp):
        assert resp.status_code == 200, resp.text
        c = resp.json()["choices"][0]
        return c["message"]["content"] if "chat" in path else c["text"]

    whole = text(httpx.post(servers["both"].base_url + path, json=body, timeout=60))
    plain = text(httpx.post(servers["both"].base_url + path, timeout=60,
                            json={k: v for k, v in body.items() if "penalty" not in k}))
    assert whole != plain  # the penalties do something here
    assert text(two_hops(servers, path, body)) == whole


def test_min_tokens_through_two_hops(servers):
    """The router drops min_tokens on the prefill hop; the decode hop refuses (502, so the router recomputes) a
    first token that would have ended the answer too early, and otherwise honours min_tokens."""
    eos = servers["decode"].engine.eos_token_ids[0]
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "min_tokens": 6}
    kv = httpx.post(servers["prefill"].base_url + "/v1/completions", timeout=60,
                    json={**body, "max_tokens": 1, "min_tokens": None,
                          "kv_transfer_params": {"do_remote_decode": True}}).json()["kv_transfer_params"]
    bad = httpx.post(servers["decode"].base_url + "/v1/completions", timeout=60,
                     json={**body, "kv_transfer_params": {**kv, "first_token_ids": [eos]}})
    assert bad.status_code == 502 and bad.json()["error"]["code"] == "kv_transfer_failed", bad.text
    wait_idle(servers["decode"].engine)
    whole = httpx.post(servers["both"].base_url + "/v1/completions", json=body, timeout=60).json()
    split = two_hops(servers, "/v1/completions", body).json()
    assert split["choices"][0]["text"] == whole["choices"][0]["text"]
    assert split["usage"]["completion_tokens"] >= 6


# ------------------------------------------------------------------------------------------------ n > 1


def test_n_choices_with_a_seed(servers):
    client = servers["both"].client()
    kw = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 42,
          "extra_body": {"ignore_eos": True}}
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # the choices differ (seeds 42, 43, 44)
    assert a.usage.completion_tokens == 24
    one = client.completions.create(n=1, **kw)
    assert one.choices[0].text == a.choices[0].text  # choice i uses seed + i
    shifted = client.completions.create(n=1, **{**kw, "seed": 43})
    assert shifted.choices[0].text == a.choices[1].text

    # streaming: chunks carry their index and interleave; put together they are the non-streamed choices
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
    texts = ["", "", ""]
    order = []
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            order.append(ch.index)
    assert texts == [c.text for c in a.choices]
    assert order != sorted(order)  # interleaved, not one choice after another
    assert chunks[-1].usage.completion_tokens == 24

    # chat, with logprobs per choice
    chat = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=1.0, seed=3, n=2,
                                          logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 4 for c in chat.choices)
    chunks = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=1.0,
                                                 seed=3, n=2, stream=True, extra_body={"ignore_eos": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    got = ["", ""]
    for c in chunks:
        for ch in c.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == [c.message.content for c in chat.choices]


def test_n_choices_through_two_hops_equal_one(servers):
    """The prefill hop computes choice 0; the decode hop imports its KV and recomputes the prompt for the rest."""
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.8, "seed": 5, "n": 3,
            "ignore_eos": True, "logprobs": 1}
    whole = httpx.post(servers["both"].base_url + "/v1/completions", json=body, timeout=60).json()
    hop = httpx.post(servers["prefill"].base_url + "/v1/completions", timeout=60,
                     json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}).json()
    assert len(hop["choices"]) == 1  # one first token, one KV lease
    split = two_hops(servers, "/v1/completions", body).json()
    assert [c["text"] for c in split["choices"]] == [c["text"] for c in whole["choices"]]
    assert [c["logprobs"]["tokens"] for c in split["choices"]] == [c["logprobs"]["tokens"] for c in whole["choices"]]
    assert split["usage"] == whole["usage"]
    wait_idle(servers["decode"].engine)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_n_choices_kv_failure_is_a_502_and_the_retry_is_whole(servers, stream):
    """Choice 0's failed KV import must come before any byte (a 502 the router can answer by recomputing),
    even though choice 1 (local prefill) has tokens already; the retry with the same X-Request-Id is whole."""
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.8, "seed": 2, "n": 2,
            "ignore_eos": True, "logprobs": 1, "stream": stream}
    kv = httpx.post(servers["prefill"].base_url + "/v1/completions", timeout=60,
                    json={**body, "stream": False, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
                    ).json()["kv_transfer_params"]
    kv.pop("first_token_logprobs")
    headers = {"X-Request-Id": f"retry-{stream}"}
    bad = httpx.post(servers["decode"].base_url + "/v1/completions", json={**body, "kv_transfer_params": kv},
                     headers=headers, timeout=60)
    assert bad.status_code == 502, bad.text
    retry = httpx.post(servers["decode"].base_url + "/v1/completions", json=body, headers=headers, timeout=60)
    whole = httpx.post(servers["both"].base_url + "/v1/completions", json=body, timeout=60)

    def texts(resp):
        assert resp.status_code == 200, resp.text
        if not stream:
            return [(c["text"], c["finish_reason"]) for c in resp.json()["choices"]]
        got = [["", None], ["", None]]
        for c in sse(resp):
            for ch in c.get("choices", []):
                got[ch["index"]][0] += ch["text"]
                got[ch["index"]][1] = ch["finish_reason"] or got[ch["index"]][1]
        return [tuple(g) for g in got]

    assert texts(retry) == texts(whole)
    assert all(reason == "length" for _, reason in texts(retry))
    wait_idle(servers["decode"].engine)


def test_client_gone_aborts_every_choice(servers):
    srv = servers["both"]
    client = srv.client()
    stream = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=200, n=3, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_idle(srv.engine)
    s = srv.engine.stats()
    assert s.num_blocks_free == s.num_blocks_total


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_through_the_router_equals_a_colocated_worker(servers, stream):
    """The real router (prefill hop with max_tokens 1 and min_tokens dropped, then the decode hop): n choices
    with logprobs, penalties and min_tokens give what one `both` worker gives, with no recompute fallback."""
    router = RunningRouter(prefill=[servers["prefill"].base_url], decode=[servers["decode"].base_url]).start()
    try:
        kw = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.8, "seed": 21, "n": 2,
              "logprobs": 2, "presence_penalty": 0.5, "extra_body": {"repetition_penalty": 1.3, "min_tokens": 3}}

        def answer(client):
            if not stream:
                r = client.completions.create(**kw)
                return [c.text for c in r.choices], [c.logprobs.tokens for c in r.choices]
            texts, tokens = ["", ""], [[], []]
            for chunk in client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    texts[c.index] += c.text
                    tokens[c.index] += c.logprobs.tokens if c.logprobs else []
            return texts, tokens

        assert answer(router.client()) == answer(servers["both"].client())
        after = settled(router)
        assert outcome(after, "ok") == 1  # the two hops, no fallback
        assert outcome(after, "fallback_recompute") == 0
    finally:
        router.stop()
    wait_idle(servers["decode"].engine)
    wait_idle(servers["prefill"].engine)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("call", "param"), [
    (lambda c: c.completions.create(model=SERVED, prompt="hi", n=2, best_of=4), "best_of"),
    (lambda c: c.completions.create(model=SERVED, prompt="hi", logprobs=30), "logprobs"),
    (lambda c: c.completions.create(model=SERVED, prompt="hi", echo=True), "echo"),
    (lambda c: c.completions.create(model=SERVED, prompt="hi", logit_bias={"5": 1}), "logit_bias"),
    (lambda c: c.completions.create(model=SERVED, prompt="hi", max_tokens=3, extra_body={"min_tokens": 4}),
     "min_tokens"),
    (lambda c: c.completions.create(model=SERVED, prompt="hi", extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
    (lambda c: c.chat.completions.create(model=SERVED, messages=MESSAGES, top_logprobs=2), "top_logprobs"),
    (lambda c: c.chat.completions.create(model=SERVED, messages=MESSAGES, presence_penalty=3), "presence_penalty"),
    (lambda c: c.chat.completions.create(model=SERVED, messages=MESSAGES, n=100), "n"),
    (lambda c: c.chat.completions.create(model=SERVED, messages=MESSAGES, max_completion_tokens=2,
                                         extra_body={"min_tokens": 3}), "min_tokens"),
])
def test_refusals_name_the_field(servers, call, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(servers["both"].client())
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body
    assert info.value.body["message"].startswith(param + ":"), info.value.body
