"""Parsing and validation of OpenAI requests (worker/protocol.py): what is accepted, and what a refusal says."""

from __future__ import annotations

import json

import pytest
from baton.worker.engine.types import SamplingParams
from baton.worker.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionStreamResponse,
    RequestError,
    parse_request,
    sse_event,
)


def completion(**fields) -> CompletionRequest:
    body = {"model": "m", "prompt": "hello", **fields}
    return parse_request(CompletionRequest, json.dumps(body).encode())


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode())


def refused(fn, **fields) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(**fields)
    assert info.value.status == 400
    return info.value


# ------------------------------------------------------------------------------------------------ accepted


def test_completion_defaults_follow_openai():
    req = completion()
    assert req.prompt == "hello"
    assert req.max_tokens == 16
    assert not req.stream and not req.include_usage
    assert req.sampling_params(req.max_tokens) == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("text", "text"), ([1, 2, 3], [1, 2, 3]), (["one"], "one"), ([[4, 5]], [4, 5])],
)
def test_completion_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompt == expected


def test_sampling_fields_map_to_engine_params():
    req = completion(
        max_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        seed=3,
        stop=["\n", "END"],
        stop_token_ids=[2],
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
        user="u",
        kv_transfer_params={"do_remote_decode": True},
        some_future_field=1,  # unknown fields are ignored, like vLLM
    )
    sp = req.sampling_params(7)
    assert sp == SamplingParams(
        max_tokens=7,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        seed=3,
        stop=("\n", "END"),
        stop_token_ids=(2,),
        ignore_eos=True,
    )
    assert req.include_usage and req.stream
    assert req.kv_transfer_params == {"do_remote_decode": True}
    assert completion(stop="x").sampling_params(1).stop == ("x",)


def test_chat_content_parts_and_max_completion_tokens_alias():
    req = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_tokens=5,
        max_completion_tokens=9,
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert req.requested_max_tokens == 9  # the newer name wins
    assert chat(max_tokens=4).requested_max_tokens == 4
    assert chat().requested_max_tokens is None  # up to the context length, as vLLM


def test_accepts_explicit_openai_defaults():
    # What SDKs send when a user spells out the defaults must not be refused.
    completion(n=1, logprobs=None, echo=False, frequency_penalty=0, presence_penalty=0, best_of=1)
    chat(n=1, logprobs=False, response_format={"type": "text"}, tools=[], logit_bias={})


def test_sampling_api_parity_fields_map_to_engine_params():
    req = completion(n=3, best_of=3, logprobs=4, presence_penalty=0.5, frequency_penalty=-0.25,
                     repetition_penalty=1.3, min_tokens=2, ignore_eos=True, seed=9)
    assert req.num_choices == 3
    assert req.sampling_params(8) == SamplingParams(
        max_tokens=8, seed=9, ignore_eos=True, presence_penalty=0.5, frequency_penalty=-0.25,
        repetition_penalty=1.3, min_tokens=2, logprobs=4)
    assert completion(logprobs=0).sampling_params(8).logprobs == 0  # the sampled token only
    assert completion().sampling_params(8).logprobs is None
    # chat: logprobs is a switch, top_logprobs the count
    assert chat(logprobs=True, top_logprobs=5).sampling_params(8).logprobs == 5
    assert chat(logprobs=True).sampling_params(8).logprobs == 0
    assert chat(logprobs=False, top_logprobs=0).sampling_params(8).logprobs is None
    assert chat(n=2).num_choices == 2


def test_min_tokens_above_max_tokens_names_min_tokens():
    req = completion(min_tokens=9, max_tokens=4)
    with pytest.raises(RequestError) as info:
        req.check_min_tokens(4, "max_tokens")
    assert info.value.param == "min_tokens" and "at most max_tokens (4)" in info.value.message
    completion(min_tokens=4).check_min_tokens(4, "max_tokens")  # equal is fine


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 17}, "n", "less than or equal to 16"),
        ({"n": 2, "best_of": 3}, "best_of", "only best_of == n (2)"),
        ({"best_of": 2}, "best_of", "only best_of == n (1)"),
        ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt_logprobs": 1}, "prompt_logprobs", "not supported"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
        ({"echo": True}, "echo", "not supported"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"prompt": ["a", "b"]}, "prompt", "batched prompts are not supported (got 2 prompts)"),
        ({"prompt": [[1], [2]]}, "prompt", "batched prompts"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [1, -2]}, "prompt", "non-negative"),
        ({"prompt": 5}, "prompt", None),
        ({"temperature": 3}, "temperature", "less than or equal to 2 (got 3)"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": "many"}, "max_tokens", "valid integer"),
        ({"top_k": -5}, "top_k", None),
        ({"stop": ["a", ""]}, "stop", "must not be empty"),
        ({"stream": "yes please"}, "stream", "valid boolean"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage", None),
    ],
)
def test_completion_refusals_name_the_field(fields, param, words):
    err = refused(completion, **fields)
    assert err.param == param
    assert err.message.startswith(param + ":"), err.message
    if words:
        assert words in err.message, err.message
    assert err.body() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_missing_prompt():
    with pytest.raises(RequestError) as info:
        parse_request(CompletionRequest, b'{"model": "m"}')
    assert info.value.param == "prompt"
    assert info.value.message == "prompt: field required"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'system'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages[0].content[0]",
            "'image_url' are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0]",
            "'text' field",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "field required"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format.type", "not supported"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"n": 0}, "n", "greater than or equal to 1"),
    ],
)
def test_chat_refusals_name_the_field(fields, param, words):
    err = refused(chat, **fields)
    assert err.param == param, err.message
    assert words in err.message, err.message


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_bodies(raw, words):
    with pytest.raises(RequestError) as info:
        parse_request(CompletionRequest, raw)
    assert info.value.status == 400
    assert words in info.value.message


# ---------------------------------------------------------------------------------------------------- SSE


def test_sse_event_format():
    chunk = CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[{"text": "hi"}])
    event = sse_event(chunk)
    assert event.startswith("data: {") and event.endswith("}\n\n")
    assert "\n" not in event[:-2]
    assert json.loads(event[len("data: ") :]) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}],
        "usage": None,
    }
    assert sse_event({"a": "line\nbreak"}) == 'data: {"a":"line\\nbreak"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
