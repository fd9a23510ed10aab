"""Per-request state inside the engine and the post-processing of each new token (stops, detokenization)."""
from __future__ import annotations

import enum
import time

import torch

from .sampling import is_greedy
from .tokenizer import IncrementalDetokenizer
from .types import FinishReason, GenerationRequest, SamplingParams, StepOutput


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
        self.prompt_ids = list(request.prompt_token_ids)
        self.output_ids: list[int] = []
        self.mode = mode
        self.status = Status.WAITING
        self.block_ids: list[int] = []
        self.arrival = time.monotonic()
        self.greedy = is_greedy(self.params)
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

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def append_token(self, token: int) -> StepOutput:
        """Record a new token, apply the stop rules, return the output for this step."""
        out = self.output_ids
        out.append(token)
        finish: FinishReason | None = None
        if token in self.eos_ids or token in self.stop_ids:
            finish = "stop"
            delta = None if self.stops else ""
        elif not self.stops:  # fast path: no text to search or hold back, the delta is the decoder's output
            delta = self.detok.add(token)
        else:
            delta = None
            self.text += self.detok.add(token)
            start = max(0, self.emitted - self.max_stop_len)
            hit = -1
            for s in self.stops:
                i = self.text.find(s, start)
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
        return StepOutput(self.request_id, [token], delta, finish is not None, finish,
                          len(self.prompt_ids), n_out)

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
