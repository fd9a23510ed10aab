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
    """One new token per sequence at position context_len - 1; keys are the first context_len cache slots.

    Slots are computed in Python and every integer input travels in one `torch.tensor` call (this runs once
    per decode step, for every running sequence, so it is kept to a handful of tensor ops)."""
    B = len(last_tokens)
    nb = max(map(len, block_tables))
    pos = [n - 1 for n in context_lens]
    flat: list[int] = [*last_tokens, *pos]
    flat += [t[p // block_size] * block_size + p % block_size for t, p in zip(block_tables, pos)]
    for t in block_tables:
        flat += t
        if len(t) < nb:
            flat += [0] * (nb - len(t))
    data = torch.tensor(flat, dtype=torch.long)
    positions = data[B:2 * B]
    L = nb * block_size
    # additive mask (faster than a boolean one in CPU SDPA): 0 where the key exists, -inf past the context
    mask = torch.zeros(B, 1, 1, L, dtype=dtype).masked_fill_(
        (_arange(L) > positions[:, None]).view(B, 1, 1, L), float("-inf"))
    return ForwardBatch(input_ids=data[:B], positions=positions, slot_mapping=data[2 * B:3 * B],
                        logits_index=None, is_prefill=False, num_seqs=B, kv_gather=data[3 * B:], kv_len=L,
                        decode_mask=mask, num_decode=B)


_ARANGE = torch.arange(4096)


def _arange(n: int) -> torch.Tensor:
    global _ARANGE
    if n > _ARANGE.shape[0]:
        _ARANGE = torch.arange(max(n, 2 * _ARANGE.shape[0]))
    return _ARANGE[:n]


def build_step(decode: list[tuple[int, int, list[int]]], chunks: list[tuple[list[int], int, list[int]]],
               block_size: int, dtype: torch.dtype = torch.float32) -> ForwardBatch:
    """One step of any shape: `decode` rows (last token, context length, block table) first, then prefill
    `chunks` (tokens, position of the first one, block table).

    A chunk may start past position 0 -- the rest of a chunked prompt, or a prompt whose prefix came from the
    prefix cache -- and then attends to keys already in the paged cache; this is the general path (keys are
    gathered from the cache, as in decode). The two common shapes keep their faster builders: decode only,
    and whole prompts from position 0 (keys straight from the batch)."""
    if not chunks:
        return build_decode([d[0] for d in decode], [d[1] for d in decode], [d[2] for d in decode], block_size,
                            dtype)
    if not decode and all(start == 0 for _, start, _ in chunks):
        return build_prefill([c[0] for c in chunks], [c[2] for c in chunks], block_size)
    nd = len(decode)
    fb = build_decode([d[0] for d in decode], [d[1] for d in decode], [d[2] for d in decode], block_size,
                      dtype) if decode else None
    lens = [len(toks) for toks, _, _ in chunks]
    ids: list[int] = [t for toks, _, _ in chunks for t in toks]
    pos: list[int] = [p for (toks, start, _) in chunks for p in range(start, start + len(toks))]
    slots = [table[p // block_size] * block_size + p % block_size
             for (toks, start, table) in chunks for p in range(start, start + len(toks))]
    nb = max(-(-(start + len(toks)) // block_size) for toks, start, _ in chunks)
    gather: list[int] = []
    for _, _, table in chunks:
        row = table[:nb]
        gather += row + [0] * (nb - len(row))
    Bp, Lq, Lk = len(chunks), max(lens), nb * block_size
    positions = torch.tensor(pos, dtype=torch.long)
    ends = torch.tensor(lens, dtype=torch.long).cumsum(0)
    n = torch.tensor(lens, dtype=torch.long)
    if Bp == 1:
        pad, unpad, qpos = None, None, positions.view(1, -1)
    else:
        ar = torch.arange(Lq)
        pad = (ends - n)[:, None] + torch.minimum(ar[None, :], n[:, None] - 1)  # [Bp, Lq] into the chunk tokens
        unpad = (ar[None, :] < n[:, None]).flatten().nonzero().squeeze(1)
        qpos = positions[pad]
    mask = torch.zeros(Bp, 1, qpos.shape[1], Lk, dtype=dtype).masked_fill_(
        (_arange(Lk)[None, None, :] > qpos[:, :, None]).unsqueeze(1), float("-inf"))
    logits_index = (ends - 1) + nd
    if fb is None:
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long), positions=positions,
            slot_mapping=torch.tensor(slots, dtype=torch.long), logits_index=logits_index, is_prefill=False,
            num_seqs=Bp, num_decode=0, ctx_gather=torch.tensor(gather, dtype=torch.long), ctx_len=Lk,
            ctx_pad=pad, ctx_unpad=unpad, ctx_mask=mask)
    fb.input_ids = torch.cat((fb.input_ids, torch.tensor(ids, dtype=torch.long)))
    fb.positions = torch.cat((fb.positions, positions))
    fb.slot_mapping = torch.cat((fb.slot_mapping, torch.tensor(slots, dtype=torch.long)))
    fb.logits_index = torch.cat((torch.arange(nd), logits_index))
    fb.num_seqs = nd + Bp
    fb.num_decode = nd
    fb.ctx_gather, fb.ctx_len, fb.ctx_pad, fb.ctx_unpad, fb.ctx_mask = \
        torch.tensor(gather, dtype=torch.long), Lk, pad, unpad, mask
    return fb
