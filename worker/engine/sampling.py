"""Batched token sampling: greedy, temperature, top-k, top-p; per-request seeds via torch.Generator; penalties,
min_tokens and logprobs (`Sampler.sample_sequences`).

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise, equivalent to drawing from p): every
sampled row draws exactly `vocab` exponentials from its own generator per step, so a seeded request gives
the same tokens whatever else shares its batch (penalties change the logits, never the noise drawn).

Order, as vLLM's sampler: raw logits -> logprobs taken here (vLLM's default `logprobs_mode="raw_logprobs"`)
-> min_tokens mask -> repetition, frequency, presence penalties -> greedy argmax, or temperature -> top-k ->
top-p -> draw.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from .types import MAX_LOGPROBS, InvalidRequest, SamplingParams, TokenLogprob


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature == 0.0 or p.top_k == 1


def needs_processing(p: SamplingParams) -> bool:
    """Whether a request needs more than the plain logits: penalties, a min_tokens mask or logprobs.

    False for every request that existed before these options, so those keep the engine's fast paths (the
    greedy argmax in decode) and give the same tokens as before."""
    return (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
            or p.min_tokens > 0 or p.logprobs is not None)


def validate(p: SamplingParams) -> None:
    """InvalidRequest naming the field for penalty / min_tokens / logprobs values the sampler cannot honour."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not -2.0 <= v <= 2.0:  # also refuses NaN
            raise InvalidRequest(f"{name} must be in [-2, 2]", param=name)
    if not 0.0 < p.repetition_penalty <= 1e4:
        raise InvalidRequest("repetition_penalty must be > 0 (1 disables it)", param="repetition_penalty")
    if p.min_tokens < 0 or p.min_tokens > p.max_tokens:
        raise InvalidRequest(f"min_tokens must be in [0, max_tokens={p.max_tokens}]", param="min_tokens")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")


class SampledSequence(Protocol):
    """What `Sampler.sample_sequences` reads from (and writes to) the engine's per-request state."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    eos_ids: frozenset[int]
    stop_ids: frozenset[int]
    next_logprob: TokenLogprob | None  # set here, consumed by the sequence's next append_token


def apply_penalties(logits: torch.Tensor, params: Seq[SamplingParams], prompts: Seq[Seq[int]],
                    outputs: Seq[Seq[int]], banned: Seq[frozenset[int]]) -> torch.Tensor:
    """logits [B, V] -> a copy with each row's min_tokens mask and penalties applied (rows without any are
    left as they are).

    - min_tokens: while a row has generated fewer than `min_tokens`, the `banned` tokens (EOS and
      stop_token_ids) get -inf.
    - repetition_penalty r (vLLM / HF): every token seen in the prompt or the output: logit / r if positive,
      logit * r otherwise.
    - frequency f and presence p (OpenAI): logit -= f * count + p * (count > 0), count = occurrences of the
      token in the output only.
    """
    x = logits.clone()
    V = x.shape[-1]
    for i, p in enumerate(params):
        out = outputs[i]
        row = x[i]
        if p.min_tokens > len(out) and banned[i]:
            row[torch.tensor(sorted(banned[i]), dtype=torch.long)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool)
            seen[torch.tensor(list(prompts[i]), dtype=torch.long)] = True
            if out:
                seen[torch.tensor(list(out), dtype=torch.long)] = True
            r = p.repetition_penalty
            row.copy_(torch.where(seen, torch.where(row > 0, row / r, row * r), row))
        if (p.frequency_penalty or p.presence_penalty) and out:
            counts = torch.bincount(torch.tensor(list(out), dtype=torch.long), minlength=V)[:V].to(x.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return x


def token_logprobs(logits: torch.Tensor, tokens: Seq[int], nums: Seq[int | None]) -> list[TokenLogprob | None]:
    """Raw logprobs (log_softmax of `logits`) of each row's `tokens[i]` and its `nums[i]` most likely tokens;
    None for rows whose `nums[i]` is None."""
    rows = [i for i, n in enumerate(nums) if n is not None]
    result: list[TokenLogprob | None] = [None] * len(nums)
    if not rows:
        return result
    lp = logits.index_select(0, torch.tensor(rows, dtype=torch.long)).float().log_softmax(dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in rows], dtype=torch.long)
    chosen = lp.gather(1, chosen_ids[:, None])  # [R, 1]
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    kmax = max(nums[i] for i in rows)
    top_v, top_i = (torch.topk(lp, min(kmax, lp.shape[-1]), dim=-1) if kmax else (None, None))
    chosen = chosen[:, 0].tolist()
    for r, i in enumerate(rows):
        n = nums[i]
        top = tuple(zip(top_i[r, :n].tolist(), top_v[r, :n].tolist())) if n else ()
        result[i] = TokenLogprob(int(tokens[i]), chosen[r], int(ranks[r]), top)
    return result


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """logits [B, V] float32 -> one token id per row."""
        greedy = [is_greedy(p) for p in params]
        if all(greedy):
            return logits.argmax(dim=-1).tolist()
        out = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        sel = torch.tensor(rows, dtype=torch.long)
        x = logits.index_select(0, sel)
        temps = torch.tensor([params[i].temperature for i in rows], dtype=x.dtype)
        x = x / temps[:, None]
        V = x.shape[-1]
        ks = [params[i].top_k if 0 < params[i].top_k < V else 0 for i in rows]
        if any(ks):
            kmax = max(ks)
            top = torch.topk(x, kmax, dim=-1).values  # [R, kmax], descending
            kth = top[torch.arange(len(rows)), torch.tensor([k - 1 if k else kmax - 1 for k in ks])]
            kth = torch.where(torch.tensor([k > 0 for k in ks]), kth, torch.full_like(kth, float("-inf")))
            x = x.masked_fill(x < kth[:, None], float("-inf"))
        ps = [params[i].top_p for i in rows]
        if any(p < 1.0 for p in ps):
            sorted_x, order = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            drop = before > torch.tensor(ps, dtype=x.dtype)[:, None]
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for r, i in enumerate(rows):
            noise[r].exponential_(generator=generators[i] or self.generator)
        picked = (probs / noise).argmax(dim=-1)
        out[sel] = picked
        return out.tolist()


    @torch.inference_mode()
    def sample_sequences(self, logits: torch.Tensor, seqs: Seq[SampledSequence]) -> list[int]:
        """`sample` for the engine's sequences, with penalties, min_tokens and logprobs from their state.

        The token ids are returned; each sequence that asked for logprobs gets them in `next_logprob`, which
        its next `append_token` puts on the step's output. A batch where no sequence needs any of this costs
        one `any()` more than `sample`."""
        params = [s.params for s in seqs]
        generators = [s.generator for s in seqs]
        if not any(needs_processing(p) for p in params):
            return self.sample(logits, params, generators)
        processed = apply_penalties(logits, params, [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                                    [s.eos_ids | s.stop_ids for s in seqs])
        tokens = self.sample(processed, params, generators)
        for seq, lp in zip(seqs, token_logprobs(logits, tokens, [p.logprobs for p in params])):
            seq.next_logprob = lp
        return tokens


def advance_generator(generator: torch.Generator, vocab_size: int) -> None:
    """Consume one step of noise (what `Sampler.sample` draws for one token) without sampling."""
    torch.empty(vocab_size).exponential_(generator=generator)
