"""OpenAI-compatible request/response models for the worker HTTP API (completions and chat completions).

Requests are validated here, so every refusal names the request field at fault; responses carry vLLM's
top-level `kv_transfer_params`, which the router uses to chain the prefill hop to the decode hop.

Supported: one prompt per request, `n` choices (up to `MAX_N`; `best_of` only equal to `n`), text content only,
greedy/sampled decoding with temperature, top_p, top_k, seed, stop strings and stop token ids, presence /
frequency / repetition penalties, min_tokens, ignore_eos, logprobs (completions: `logprobs: N`; chat:
`logprobs: true` + `top_logprobs: N`; N <= 20). Refused with HTTP 400 naming the field (never silently
ignored): batched prompts, `best_of != n`, echo, suffix, logit_bias, tools, non-text content parts, JSON
response formats, prompt_logprobs.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from baton.worker.engine.types import MAX_LOGPROBS, SamplingParams
from baton.worker.logprobs import ChatLogprobs, CompletionLogprobs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: OpenAI's default for /v1/completions when `max_tokens` is absent.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: The most choices (`n`) one request may ask for: each is a sequence of its own in the engine's batch.
MAX_N = 16


class RequestError(Exception):
    """A request the API refuses; `status` is the HTTP status, the rest becomes the OpenAI error body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI + vLLM extras)."""

    # Unknown fields are ignored (as vLLM does), so newer clients keep working.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("prompt_logprobs are not supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per token the response carries; None: no logprobs (set by each endpoint)."""
        return None

    def check_min_tokens(self, max_tokens: int, max_param: str) -> None:
        """min_tokens above the (possibly derived) max_tokens can never be met: 400 naming min_tokens."""
        if self.min_tokens and self.min_tokens > max_tokens:
            raise RequestError(f"min_tokens: must be at most {max_param} ({max_tokens}), got {self.min_tokens}",
                               param="min_tokens")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop: tuple[str, ...]
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,) if self.stop else ()
        else:
            stop = tuple(self.stop)
        top_k = self.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=max(top_k, 0),
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            min_tokens=int(self.min_tokens or 0),
            logprobs=self.num_logprobs,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt` is text or token ids; a list of one prompt is accepted, batches are not."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, str):
            return v
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v[0], int):
            if any(t < 0 for t in v):
                raise ValueError("token ids must be non-negative")
            return v
        if len(v) > 1:
            raise ValueError(
                f"batched prompts are not supported (got {len(v)} prompts); send one prompt per request"
            )
        return _one_prompt_inner(v[0])

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        # RequestError, not ValueError: pydantic would report a model-level error without the field's name
        if self.best_of is not None and self.best_of != self.num_choices:
            raise RequestError(f"best_of: only best_of == n ({self.num_choices}) is supported (no server-side "
                               f"ranking of candidates), got {self.best_of}", param="best_of")
        return self


def _one_prompt_inner(v: str | list[int]) -> str | list[int]:
    if isinstance(v, list):
        if not v:
            raise ValueError("prompt must not be empty")
        if any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
    return v


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported (only 'text')")
        if self.text is None:
            raise ValueError("a content part of type 'text' needs a 'text' field")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format {v!r} is not supported (only 'text')")
        return v


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # vLLM extra

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:  # OpenAI: "logprobs must be set to true if ... used"
            raise RequestError("top_logprobs: needs logprobs: true", param="top_logprobs")
        return self

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out


def _format_loc(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            part in ("str", "int", "float", "bool", "none", "dict", "list") or "[" in part or part[:1].isupper()
        ):
            continue  # a union member / model name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _pick_error(errors: list[dict]) -> dict:
    """Of pydantic's errors (one per union branch, often), pick the one that tells the user the most."""

    def score(e: dict) -> tuple:
        # Our own ValueErrors ("value_error") explain the problem best; then deepest location.
        return (e.get("type") == "value_error", e.get("type") != "missing", len(e.get("loc", ())))

    return max(errors, key=score)


def validation_error_to_request_error(exc: ValidationError) -> RequestError:
    """One clear message naming the field, e.g. "temperature: Input should be less than or equal to 2 (got 3)"."""
    errors = exc.errors(include_url=False)
    e = _pick_error(errors)
    param = _format_loc(tuple(e.get("loc", ()))) or None
    msg = str(e.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param == "prompt" and e.get("type") not in ("value_error", "missing"):
        msg = "must be a string, a list of token ids, or a list holding one of those"
    if e.get("type") == "missing":
        text = f"{param}: field required" if param else "a required field is missing"
    else:
        text = f"{param}: {msg}" if param else msg
        if e.get("type") not in ("value_error", "missing") and "input" in e:
            got = e["input"]
            if isinstance(got, (int, float, str, bool)) or got is None:
                shown = json.dumps(got)
                if len(shown) <= 60:
                    text += f" (got {shown})"
    return RequestError(text, param=param)


def parse_request(model: type[BaseModel], raw: bytes) -> Any:
    """Bytes of a request body -> a validated request model, or RequestError (400) naming the problem."""
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_request_error(exc) from None


# ---------------------------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "baton"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------- SSE


def sse_event(payload: BaseModel | dict) -> str:
    """One server-sent event as the OpenAI API sends it: `data: {json}\\n\\n`."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
