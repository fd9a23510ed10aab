"""The contract between the inference engine and everything that drives it (HTTP API, router, KV transport).

Kept in one small module so the HTTP server and the engine can be built and tested independently: the
server only ever sees these types, never the engine's internals.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["both", "prefill", "decode"]
#: kv_transfer_params key: the first token's logprobs, computed by the prefill hop, for the decode hop to emit.
FIRST_TOKEN_LOGPROBS = "first_token_logprobs"
FinishReason = Literal["stop", "length", "abort"]
#: The most top logprobs a request may ask for (vLLM's default --max-logprobs; OpenAI's chat API allows 20).
MAX_LOGPROBS = 20


class EngineError(Exception):
    """Base class for errors the engine reports to its callers (never a crash of the engine loop)."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked (prompt too long, bad sampling value); HTTP 400.

    `param` names the offending OpenAI request field, e.g. "max_tokens", so the API can say which one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloaded(EngineError):
    """The waiting queue is full; HTTP 503 with Retry-After (never an unbounded queue or a hang)."""


class KVTransferFailed(EngineError):
    """A decode-role request could not obtain its KV cache from the prefill worker (peer gone, lease expired)."""


class KVParamsRejected(EngineError):
    """`kv_transfer_params` this worker may not act on (unsigned, badly signed, expired: `kv/params_auth.py`);
    raised before any KV connection is opened. HTTP 403 `launch.ErrorCode.KV_PARAMS_REJECTED`, which the router answers by
    recomputing the prompt. `reason` labels baton_kv_params_rejected_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults follow the OpenAI API (temperature 1, top_p 1); greedy = temperature 0."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Penalties, as vLLM applies them (all off by default): repetition (HF/vLLM) over prompt + generated tokens,
    # divides a positive logit by it and multiplies a negative one; frequency/presence (OpenAI) over the
    # generated tokens only: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings not matched) before this many
    logprobs: int | None = None  # None: no logprobs; N >= 0: the sampled token's logprob + the N most likely


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of one generated token, and of the `top` most likely tokens at that step.

    Raw logprobs (vLLM's default `logprobs_mode="raw_logprobs"`): log_softmax of the model's logits, before
    penalties, min_tokens, temperature and top-k/top-p, so they describe the model, not the sampling settings.
    """

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first

    def to_dict(self) -> dict:
        """JSON form, carried from the prefill hop to the decode hop in `kv_transfer_params`."""
        return {"token_id": self.token_id, "logprob": self.logprob, "rank": self.rank,
                "top": [[t, lp] for t, lp in self.top]}

    @classmethod
    def from_dict(cls, d: dict) -> TokenLogprob:
        return cls(int(d["token_id"]), float(d["logprob"]), int(d["rank"]),
                   tuple((int(t), float(lp)) for t, lp in d.get("top") or ()))


@dataclass
class GenerationRequest:
    """One request as the engine sees it: token ids in, a stream of `StepOutput` out.

    `kv_transfer_params` follows vLLM's disaggregation protocol:
    - prefill hop (to a `prefill` worker): `{"do_remote_decode": True}`; the engine runs the prompt, samples
      the first token, keeps the request's KV blocks under a lease and returns, on its final output, the params
      that the decode hop needs (`do_remote_prefill`, `remote_engine_id`, `remote_request_id`,
      `remote_block_ids`, `remote_host`, `remote_port`, `first_token_ids`, ...). With logprobs asked for, the
      HTTP server adds `first_token_logprobs` (`[TokenLogprob.to_dict()]`, key `FIRST_TOKEN_LOGPROBS`): the
      decode worker never sees the first token's logits.
    - decode hop (to a `decode` worker): those returned params; the engine imports the KV blocks through the
      KV transport and continues decoding. Its stream starts with the first token, so the decode hop's response
      is the whole completion and equals what a `both` worker would produce (greedy).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    kv_transfer_params: dict | None = None


@dataclass
class StepOutput:
    """What a request produced in one engine step; the last one has `finished=True`."""

    request_id: str
    token_ids: list[int]  # tokens new in this step (usually one)
    text: str  # text new in this step, detokenized incrementally; a matched stop string is not included
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    kv_transfer_params: dict | None = None  # set on the final output of a prefill hop
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids when SamplingParams.logprobs is set
    #: on the output carrying the first token: seconds by `baton.launch.Timing` name (queue, then prefill or
    #: kv_import), what the HTTP server reports as Server-Timing (the router's TTFT stages)
    timings: dict[str, float] | None = None
    #: with `timings`: when the first token existed (time.monotonic()), the instant they were measured to, so a
    #: trace's queue / prefill / kv_import spans (`worker/request_trace.py`) last exactly what Server-Timing says
    first_token_at: float | None = None


@dataclass
class EngineStats:
    """A snapshot for /metrics and for the router's load balancing (counters are cumulative)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # used blocks / total blocks, 0..1
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    num_kv_leases: int = 0  # prefill role: requests whose KV waits to be pulled
    kv_leases_pulled_total: int = 0  # prefill role: leases their decode worker pulled
    kv_leases_expired_total: int = 0  # prefill role: leases that expired unpulled (the prompt was recomputed)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    busy_seconds_total: float = 0.0  # time spent in forward steps (baton_engine_busy_seconds)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries)
    prefix_cache_hits_total: int = 0  # of which were cached (vllm:prefix_cache_hits)
    # KV handoff (decode side: imports done through the transport), for baton_kv_transfer_* metrics
    kv_transport: str | None = None  # backend in use (baton_kv_transport_info{transport}); None: no transport
    kv_transfers_total: int = 0
    kv_transfer_bytes_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    kv_transfer_seconds_buckets: tuple = ()  # ((le, cumulative count), ...) of baton_kv_transfer_seconds
    kv_transfer_failures: dict = field(default_factory=dict)  # reason -> failed imports
    kv_params_rejected: dict = field(default_factory=dict)  # reason -> refused kv_transfer_params (params_auth)


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class Engine(Protocol):
    """What the HTTP API needs from an engine."""

    role: Role
    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Stream outputs; raises InvalidRequest / EngineOverloaded / KVTransferFailed before the first output.

        Closing the iterator early (client went away) aborts the request and frees its KV blocks.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...
