"""Per-request state inside the engine and the post-processing of each new token (stops, detokenization)."""
from __future__ import annotations

import enum
import time

import torch

from baton.launch import Timing

from .sampling import is_greedy, needs_processing, validate
from .tokenizer import IncrementalDetokenizer
from .types import (
    FIRST_TOKEN_LOGPROBS,
    FinishReason,
    GenerationRequest,
    KVTransferFailed,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)


class Status(enum.Enum):
    WAITING = "waiting"
    IMPORTING = "importing"  # decode role: KV being pulled from the prefill worker
    RUNNING = "running"
    FINISHED = "finished"


class Mode(enum.Enum):
    NORMAL = "normal"
    PREFILL_HOP = "prefill_hop"  # run the prompt, sample one token, keep the KV under a lease
    IMPORT = "import"  # decode hop: KV comes from a remote prefill


class Sequence:
    def __init__(self, request: GenerationRequest, mode: Mode, detok: IncrementalDetokenizer,
                 eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.request_id = request.request_id
        self.request = request
        self.params: SamplingParams = request.sampling
        validate(self.params)  # InvalidRequest, raised by engine.generate before the first output
        self.prompt_ids = list(request.prompt_token_ids)
        self.output_ids: list[int] = []
        self.mode = mode
        self.scheduled_at: float | None = None  # when it first left the queue (prefill or KV import scheduled)
        self.status = Status.WAITING
        self.block_ids: list[int] = []
        self.num_computed = 0  # tokens whose K/V is in `block_ids` (prefix-cache hits included)
        self.num_registered = 0  # leading full blocks offered to the prefix cache
        self.block_keys: list[bytes] = []  # prefix-cache keys of the full blocks (kv_cache.block_keys)
        self.lease_id: str | None = None  # prefill hop: the KV lease, from the step that ends its prompt
        self.lease_expires = 0.0  # its end, wall-clock (epoch) seconds: the expiry signed into kv_transfer_params
        self.arrival = time.monotonic()
        # greedy: a plain argmax of the logits picks the next token (the engine's fast path); not with penalties,
        # min_tokens or logprobs, which go through `Sampler.sample_sequences`
        self.greedy = is_greedy(self.params) and not needs_processing(self.params)
        self.next_logprob: TokenLogprob | None = None  # written by the sampler, read by append_token
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.params.seed)
        self.detok = detok
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.eos_ids = frozenset(() if self.params.ignore_eos else eos_token_ids)
        self.stops = tuple(s for s in self.params.stop if s)
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.max_tokens = 1 if mode is Mode.PREFILL_HOP else self.params.max_tokens
        self.max_model_len = max_model_len
        self.text = ""  # generated text so far, kept only while stop strings are searched
        self.emitted = 0
        self.finish_reason: FinishReason | None = None
        self.aborted = False
        self.kv_params: dict | None = request.kv_transfer_params
        self.min_tokens = self.params.min_tokens
        self.min_text_end = 0  # stop strings must end after this much text: what came before min_tokens
        if mode is Mode.IMPORT:
            self.next_logprob = self._check_import()

    def _check_import(self) -> TokenLogprob | None:
        """Decode hop: the prefill worker sampled the first token; check that it honoured what this request
        asks of it, and return its logprobs. KVTransferFailed (HTTP 502 `kv_transfer_failed`, which the router
        answers by recomputing the prompt on the decode worker) when it could not have: a first token that is
        EOS or a stop token while min_tokens > 0 (the router's prefill hop drops min_tokens), or logprobs asked
        for but not in the params."""
        params = self.kv_params or {}
        first = (params.get("first_token_ids") or [None])[0]
        if self.params.min_tokens > 0 and (first in self.eos_ids or first in self.stop_ids):
            raise KVTransferFailed(f"the prefill hop's first token ({first}) is a stop token, but min_tokens is "
                                   f"{self.params.min_tokens}")
        if self.params.logprobs is None:
            return None
        try:
            lp = TokenLogprob.from_dict((params.get(FIRST_TOKEN_LOGPROBS) or [])[0])
        except (IndexError, KeyError, TypeError, ValueError):
            raise KVTransferFailed(f"logprobs were asked for, but kv_transfer_params has no valid "
                                   f"{FIRST_TOKEN_LOGPROBS}") from None
        if lp.token_id != first or len(lp.top) < self.params.logprobs:
            raise KVTransferFailed(f"kv_transfer_params.{FIRST_TOKEN_LOGPROBS} does not match the first token "
                                   f"or has fewer than {self.params.logprobs} top logprobs")
        return lp

    @property
    def status(self) -> Status:
        return self._status

    @status.setter
    def status(self, value: Status) -> None:
        # the scheduler's first RUNNING (prefill scheduled) or IMPORTING (KV pull started) ends the queue wait
        if self.scheduled_at is None and value in (Status.RUNNING, Status.IMPORTING):
            self.scheduled_at = time.monotonic()
        self._status = value

    def first_token_timings(self, now: float | None = None) -> dict[str, float] | None:
        """What the first token waited for and cost, in seconds by Server-Timing name (`baton.launch.Timing`):
        the queue, then the prompt's forward or the KV import, until `now` (default: this instant). The router
        splits its TTFT with them."""
        if self.scheduled_at is None:
            return None
        now = time.monotonic() if now is None else now
        work = Timing.KV_IMPORT if self.mode is Mode.IMPORT else Timing.PREFILL
        return {Timing.QUEUE: self.scheduled_at - self.arrival, work: now - self.scheduled_at}

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def append_token(self, token: int) -> StepOutput:
        """Record a new token, apply the stop rules, return the output for this step."""
        out = self.output_ids
        out.append(token)
        logprob, self.next_logprob = self.next_logprob, None
        finish: FinishReason | None = None
        below_min = len(out) <= self.min_tokens  # vLLM: no stop of any kind before min_tokens tokens
        if (token in self.eos_ids or token in self.stop_ids) and not below_min:
            finish = "stop"
            delta = None if self.stops else ""
        elif not self.stops:  # fast path: no text to search or hold back, the delta is the decoder's output
            delta = self.detok.add(token)
        else:
            delta = None
            self.text += self.detok.add(token)
            start = max(0, self.emitted - self.max_stop_len)
            hit = -1
            if below_min:
                self.min_text_end = len(self.text)
            else:
                for s in self.stops:
                    i = self.text.find(s, max(start, self.min_text_end - len(s) + 1))
                    if i >= 0 and (hit < 0 or i < hit):
                        hit = i
            if hit >= 0:
                self.text = self.text[:hit]
                finish = "stop"
        n_out = len(out)
        if finish is None and (n_out >= self.max_tokens or len(self.prompt_ids) + n_out >= self.max_model_len):
            finish = "length"
        if delta is None:
            end = len(self.text)
            if finish is None:
                end -= self._held_back()
            delta = self.text[self.emitted:end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
        if finish is not None:
            self.finish_reason = finish
        now = time.monotonic() if n_out == 1 else None
        return StepOutput(self.request_id, [token], delta, finish is not None, finish,
                          len(self.prompt_ids), n_out, logprobs=None if logprob is None else [logprob],
                          timings=self.first_token_timings(now) if now is not None else None,
                          first_token_at=now if self.scheduled_at is not None else None)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        text = self.text
        for n in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def abort_output(self) -> StepOutput:
        self.finish_reason = "abort"
        return StepOutput(request_id=self.request_id, token_ids=[], text="", finished=True, finish_reason="abort",
                          num_prompt_tokens=len(self.prompt_ids), num_generated_tokens=len(self.output_ids))
