"""The engine's per-token logprobs (`TokenLogprob`) in the OpenAI API's two response formats (the response
models live here, `protocol.py` uses them in its choices).

- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per token;
  `top_logprobs[i]` maps token text -> logprob for the N most likely tokens plus the sampled one.
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`, with
  exactly the N most likely tokens in `top_logprobs`.

Token text is each token decoded alone, special tokens included (what vLLM returns); `text_offset` counts the
characters of those texts from the start of the completion.
"""
from __future__ import annotations

from baton.worker.engine.types import Tokenizer, TokenLogprob
from pydantic import BaseModel, Field


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: one entry per generated token; `top_logprobs` maps token text to
    logprob for the N most likely tokens plus the sampled one (so up to N+1 entries, as OpenAI documents)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class LogprobRenderer:
    """One per response (caches token texts); `offset` carries text_offset across a stream's chunks."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        t = self._texts.get(token_id)
        if t is None:
            t = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def completion(self, lps: list[TokenLogprob], offset: int = 0) -> tuple[CompletionLogprobs, int]:
        """(logprobs of `lps`, the text offset after them)."""
        out = CompletionLogprobs()
        for lp in lps:
            tok = self.text(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.text_offset.append(offset)
            top = {self.text(t): v for t, v in lp.top}
            top.setdefault(tok, lp.logprob)
            out.top_logprobs.append(top)
            offset += len(tok)
        return out, offset

    def chat(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=self.text(lp.token_id), logprob=lp.logprob,
                             bytes=list(self.text(lp.token_id).encode()),
                             top_logprobs=[TopLogprob(token=self.text(t), logprob=v, bytes=list(self.text(t).encode()))
                                           for t, v in lp.top])
            for lp in lps
        ])
