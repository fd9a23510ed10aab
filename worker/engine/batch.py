"""Build the per-step `ForwardBatch` (positions, cache slots, attention masks) once for all layers."""
from __future__ import annotations

import torch

from .model import ForwardBatch


def build_prefill(token_lists: list[list[int]], block_tables: list[list[int]], block_size: int) -> ForwardBatch:
    """Prompts (all starting at position 0) of mixed lengths, flattened; attention runs on a padded view."""
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    B = len(token_lists)
    flat = [t for toks in token_lists for t in toks]
    input_ids = torch.tensor(flat, dtype=torch.long)
    ends = lens.cumsum(0)
    starts = ends - lens
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    slots = []
    for toks, table in zip(token_lists, block_tables):
        pos = torch.arange(len(toks))
        slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    fb = ForwardBatch(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                      logits_index=ends - 1, is_prefill=True, num_seqs=B)
    if B > 1:
        Lp = int(lens.max())
        ar = torch.arange(Lp)
        valid = ar[None, :] < lens[:, None]  # [B, Lp]
        fb.pad_gather = starts[:, None] + torch.minimum(ar[None, :], lens[:, None] - 1)
        fb.unpad_index = valid.flatten().nonzero().squeeze(1)
        causal = torch.ones(Lp, Lp, dtype=torch.bool).tril()
        fb.prefill_mask = (causal[None] & valid[:, None, :]).unsqueeze(1)  # [B, 1, Lp, Lp]
    return fb


def build_decode(last_tokens: list[int], context_lens: list[int], block_tables: list[list[int]],
                 block_size: int, dtype: torch.dtype = torch.float32) -> ForwardBatch:
    """One new token per sequence at position context_len - 1; keys are the first context_len cache slots."""
    B = len(last_tokens)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    nb = max(len(t) for t in block_tables)
    flat: list[int] = []
    for t in block_tables:
        flat += t
        if len(t) < nb:
            flat += [0] * (nb - len(t))
    table = torch.tensor(flat, dtype=torch.long)  # [B * nb]
    pos = ctx - 1
    slot_mapping = table[torch.arange(B) * nb + pos // block_size] * block_size + pos % block_size
    L = nb * block_size
    # additive mask (faster than a boolean one in CPU SDPA): 0 where the key exists, -inf past the context
    mask = torch.zeros(B, 1, 1, L, dtype=dtype).masked_fill_(
        (torch.arange(L)[None, :] >= ctx[:, None]).view(B, 1, 1, L), float("-inf"))
    return ForwardBatch(input_ids=torch.tensor(last_tokens, dtype=torch.long), positions=pos,
                        slot_mapping=slot_mapping, logits_index=torch.arange(B), is_prefill=False, num_seqs=B,
                        kv_gather=table, kv_len=L, decode_mask=mask)
