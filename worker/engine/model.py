"""The Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache, in plain torch.

Tokens of all sequences in a step are flattened to one `[T, hidden]` batch for every matmul (no padding
waste); only attention needs a per-sequence layout, described by `ForwardBatch` (built once per step by
`attention.py` and shared by all layers). Weights are fused at load time (q|k|v and gate|up) so a layer is a
handful of large matmuls, each a `gemm.Projection` (on the CPU in float32, oneDNN with the weight reordered once
at load).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import gemm
from .config import ModelConfig, load_model_config
from .rope import rope_tables
from .weights import load_weights


@dataclass
class ForwardBatch:
    """What one forward needs besides the weights; see `attention.build_prefill` / `build_decode`."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: flat cache slot (block * block_size + offset) for each token's K/V
    logits_index: torch.Tensor | None  # [N] long: which of the T tokens produce logits (None: all)
    is_prefill: bool
    num_seqs: int
    # prefill (every sequence starts at position 0): padded [B, Lp] layout of the T tokens
    pad_gather: torch.Tensor | None = None  # [B, Lp] indices into T (padding points at any valid token)
    unpad_index: torch.Tensor | None = None  # [T] indices into B*Lp
    prefill_mask: torch.Tensor | None = None  # [B, 1, Lp, Lp] bool (True = attend); None: one sequence, causal
    # decode (one new token per sequence): keys are gathered from the paged cache
    kv_gather: torch.Tensor | None = None  # [B * nb] block ids (block tables padded to nb blocks)
    kv_len: int = 0  # Lmax
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, Lmax] additive (0 = attend, -inf = not)
    num_decode: int = 0  # the first num_decode tokens are decode rows (one per sequence); the rest prefill
    # prefill with context (chunks past position 0, prefix-cache hits): keys gathered from the paged cache
    ctx_gather: torch.Tensor | None = None  # [Bp * nb] block ids of the Bp chunks (padded to nb blocks)
    ctx_len: int = 0  # nb * block_size
    ctx_pad: torch.Tensor | None = None  # [Bp, Lq] indices into the chunk tokens; None: one chunk
    ctx_unpad: torch.Tensor | None = None  # [T - num_decode] indices into Bp*Lq
    ctx_mask: torch.Tensor | None = None  # [Bp, 1, Lq, nb*block_size] additive (causal by position)


def _rotate_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a projection so that its output is rotate_half(original output) per head."""
    shape = w.shape
    x = w.reshape(-1, head_dim, *shape[1:])
    half = head_dim // 2
    return torch.cat((-x[:, half:], x[:, :half]), dim=1).reshape(shape)


FOLD_ROPE_BELOW_HIDDEN = 512


class Layer:
    __slots__ = ("down", "gate_up", "ln1", "ln2", "o", "qkv")


class LlamaModel:
    """Weights + forward. Stateless apart from the weights: the KV cache is passed in."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 max_len: int | None = None, gemm_kind: str | None = None) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.gemm = kind = gemm.choose(dtype, self.embed.device, gemm_kind)
        self.lm_head = gemm.Projection(self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"],
                                       gemm=kind, keep_weight=cfg.tie_word_embeddings)  # the embedding table
        self.fold_rope = cfg.hidden_size < FOLD_ROPE_BELOW_HIDDEN
        self.layers: list[Layer] = []
        for n in range(cfg.num_layers):
            p = f"model.layers.{n}."
            layer = Layer()
            layer.ln1 = weights[p + "input_layernorm.weight"]
            layer.ln2 = weights[p + "post_attention_layernorm.weight"]
            wq, wk, wv = (weights[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
            # small models: q|k|v plus rotate_half(q)|rotate_half(k), so RoPE needs no shuffling at run time
            # (see `forward`); that adds (q + k) / (q + k + v) to the qkv matmul, which only pays off while
            # per-op overhead rather than matmul time dominates
            rot = self.fold_rope
            ws = [wq, wk, wv] + ([_rotate_rows(wq, cfg.head_dim), _rotate_rows(wk, cfg.head_dim)] if rot else [])
            b_qkv = None
            if cfg.attention_bias:
                bq, bk, bv = (weights[p + f"self_attn.{x}_proj.bias"] for x in "qkv")
                bs = [bq, bk, bv] + ([_rotate_rows(bq, cfg.head_dim), _rotate_rows(bk, cfg.head_dim)] if rot else [])
                b_qkv = torch.cat(bs)
            layer.qkv = gemm.Projection(torch.cat(ws), b_qkv, kind)
            layer.o = gemm.Projection(weights[p + "self_attn.o_proj.weight"], None, kind)
            layer.gate_up = gemm.Projection(
                torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
                torch.cat([weights[p + "mlp.gate_proj.bias"], weights[p + "mlp.up_proj.bias"]]) if cfg.mlp_bias
                else None, kind)
            layer.down = gemm.Projection(weights[p + "mlp.down_proj.weight"],
                                         weights[p + "mlp.down_proj.bias"] if cfg.mlp_bias else None, kind)
            self.layers.append(layer)
            for name in list(weights):  # free the unfused copies as we go
                if name.startswith(p) and ("self_attn.q" in name or "self_attn.k" in name or "self_attn.v" in name
                                           or "gate_proj" in name or "up_proj" in name
                                           or "o_proj.weight" in name or "down_proj.weight" in name):
                    del weights[name]
        self.max_len = max_len or cfg.max_position_embeddings
        self.cos, self.sin = rope_tables(cfg, self.max_len, dtype)
        self.cos_sin = torch.stack((self.cos, self.sin), dim=1).unsqueeze(2)  # [max_len, 2, 1, D]: one gather
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        max_len: int | None = None, gemm_kind: str | None = None) -> LlamaModel:
        cfg = load_model_config(path)
        return cls(cfg, load_weights(path, cfg, dtype), dtype=dtype, max_len=max_len, gemm_kind=gemm_kind)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return w * h.to(x.dtype)

    def _attention(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        T = q.shape[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kc = k_cache.view(-1, KV, D)
        vc = v_cache.view(-1, KV, D)
        kc.index_copy_(0, fb.slot_mapping, k)
        vc.index_copy_(0, fb.slot_mapping, v)
        if fb.is_prefill:
            if fb.pad_gather is None:  # one sequence: plain causal attention over its own tokens
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    is_causal=True, enable_gqa=KV != H, scale=self.scale)
                return out[0].transpose(0, 1).reshape(T, H * D)
            B, Lp = fb.pad_gather.shape
            qp = q[fb.pad_gather].transpose(1, 2)  # [B, H, Lp, D]
            kp = k[fb.pad_gather].transpose(1, 2)
            vp = v[fb.pad_gather].transpose(1, 2)
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=fb.prefill_mask, enable_gqa=KV != H,
                                                 scale=self.scale)
            return out.transpose(1, 2).reshape(B * Lp, H * D)[fb.unpad_index]
        nd = fb.num_decode
        if nd == T:
            return self._decode_attention(q, k_cache, v_cache, fb)
        if nd == 0:
            return self._context_attention(q, k_cache, v_cache, fb)
        return torch.cat((self._decode_attention(q[:nd], k_cache, v_cache, fb),
                          self._context_attention(q[nd:], k_cache, v_cache, fb)))

    def _decode_attention(self, q, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """One query per sequence; the G query heads sharing a KV head act as G query rows."""
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B, L = fb.num_decode, fb.kv_len
        keys = k_cache.index_select(0, fb.kv_gather).view(B, L, KV, D).transpose(1, 2)  # [B, KV, L, D]
        vals = v_cache.index_select(0, fb.kv_gather).view(B, L, KV, D).transpose(1, 2)
        qd = q.view(B, KV, H // KV, D)
        out = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=fb.decode_mask, scale=self.scale)
        return out.reshape(B, H * D)

    def _context_attention(self, q, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """Prefill chunks that attend to keys already in the cache (their own were written just before)."""
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n = q.shape[0]
        L = fb.ctx_len
        B = fb.ctx_mask.shape[0]
        keys = k_cache.index_select(0, fb.ctx_gather).view(B, L, KV, D).transpose(1, 2)  # [Bp, KV, L, D]
        vals = v_cache.index_select(0, fb.ctx_gather).view(B, L, KV, D).transpose(1, 2)
        if fb.ctx_pad is None:
            qp = q.view(1, n, H, D).transpose(1, 2)  # [1, H, n, D]
        else:
            qp = q[fb.ctx_pad].transpose(1, 2)  # [Bp, H, Lq, D]
        out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=fb.ctx_mask, enable_gqa=KV != H,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(-1, H * D)
        return out if fb.ctx_unpad is None else out[fb.ctx_unpad]

    # -- forward --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                all_logits: bool = False, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the batch, write its K/V into the cache, return float32 logits [N, vocab] for `logits_index`
        (or for every token with `all_logits`). `on_layer(i)` is called as soon as layer i's K/V is in the cache
        (layer-wise KV export: a transport may read that layer while later layers compute)."""
        cfg = self.cfg
        T = fb.input_ids.shape[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rms, attention, addcmul, silu = self._rms, self._attention, torch.addcmul, F.silu
        x = F.embedding(fb.input_ids, self.embed)
        cs = self.cos_sin.index_select(0, fb.positions)  # [T, 2, 1, D]
        cos, sin = cs[:, 0], cs[:, 1]
        qs, kvs = self.q_size, self.kv_size
        qk_end, v_end = qs + kvs, qs + 2 * kvs
        nqk = H + KV
        fold, half = self.fold_rope, D // 2
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches, strict=True)):
            qkv = layer.qkv(rms(x, layer.ln1))  # [T, q | k | v (| rot(q) | rot(k))]
            # RoPE: x*cos + rotate_half(x)*sin
            qk = qkv[:, :qk_end].view(T, nqk, D)
            if fold:
                qk_rot = qkv[:, v_end:].view(T, nqk, D)
            else:
                qk_rot = torch.cat((qk[..., half:].neg(), qk[..., :half]), dim=-1)
            qk = addcmul(qk * cos, qk_rot, sin)
            attn = attention(qk[:, :H], qk[:, H:], qkv[:, qk_end:v_end].view(T, KV, D), k_cache, v_cache, fb)
            if on_layer is not None:
                on_layer(i)
            x = layer.o.add_to(x, attn)
            gate, up = layer.gate_up(rms(x, layer.ln2)).chunk(2, dim=-1)
            x = layer.down.add_to(x, silu(gate).mul_(up))
        if not all_logits and fb.logits_index is not None:
            x = x[fb.logits_index]
        return self.lm_head(rms(x, self.norm)).float()
