"""Batched token sampling: greedy, temperature, top-k, top-p; per-request seeds via torch.Generator.

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise, equivalent to drawing from p): every
sampled row draws exactly `vocab` exponentials from its own generator per step, so a seeded request gives
the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import torch

from .types import SamplingParams


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature == 0.0 or p.top_k == 1


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


def advance_generator(generator: torch.Generator, vocab_size: int) -> None:
    """Consume one step of noise (what `Sampler.sample` draws for one token) without sampling."""
    torch.empty(vocab_size).exponential_(generator=generator)
