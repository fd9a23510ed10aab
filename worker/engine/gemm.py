"""The engine's projections (q|k|v, o, gate|up, down, lm_head) as one callable each, with the weight in the
layout the CPU's GEMM wants.

Why: a decode step multiplies a few rows (the batch) by every weight of the model. PyTorch's `F.linear` on a
plain float32 weight re-reads the weight in its row-major layout on every call; oneDNN's matmul with the weight
reordered ONCE, at load, into its blocked layout (what vLLM's CPU backend does with `create_onednn_mm`) runs
the same product faster at decode-sized batches -- on SmolLM2 the lm_head alone (49152 x 576) is a third of a
batch-8 decode step. `benchmarks/engine.py --gemm` measures both on the same model, step for step.

The choice is made once per process (`GEMMS`, `choose`): "onednn" where PyTorch has oneDNN and the weights are
float32 on the CPU, else "torch" (`F.linear`, also for bfloat16: oneDNN's bf16 path needs AVX512-BF16/AMX,
which this machine lacks). `BATON_CPU_GEMM=torch|onednn` overrides it (the benchmark's A/B switch, and a way
out if a CPU misbehaves). Results are the same numbers up to float32 rounding order (tests compare greedy
tokens and logits within tolerance).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

GEMMS = ("torch", "onednn")
#: the row count oneDNN's weight layout is chosen for: the middle of the decode batches that matter (vLLM's CPU
#: backend packs for 32 too); prefill chunks (hundreds of rows) run on the same packed weight
PACK_FOR_ROWS = 32
ENV = "BATON_CPU_GEMM"


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def choose(dtype: torch.dtype, device: torch.device | str = "cpu", requested: str | None = None) -> str:
    """The GEMM for weights of `dtype` on `device`: `requested` (or $BATON_CPU_GEMM) if set, else oneDNN for
    float32 on a CPU with oneDNN, else torch. A request that cannot be honoured is refused, naming why."""
    requested = requested or os.environ.get(ENV) or None
    if requested is not None and requested not in GEMMS:
        raise ValueError(f"{ENV}={requested!r}: expected one of {', '.join(GEMMS)}")
    usable = torch.device(device).type == "cpu" and dtype == torch.float32 and _onednn_available()
    if requested == "onednn" and not usable:
        raise ValueError(f"{ENV}=onednn needs float32 weights on a CPU with oneDNN (got {dtype} on {device})")
    if requested is not None:
        return requested
    return "onednn" if usable else "torch"


class Projection:
    """`x @ W^T (+ b)` for one weight. With oneDNN the reordered copy does the work and the plain `weight` is
    dropped (None) so the model does not sit in memory twice -- unless the caller still holds it anyway (the
    lm_head tied to the embedding table), which `keep_weight` says. `shape` and `numel` stay readable."""

    __slots__ = ("bias", "gemm", "packed", "shape", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gemm: str = "torch",
                 keep_weight: bool = False) -> None:
        self.shape = tuple(weight.shape)
        self.bias = bias
        self.gemm = gemm
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_FOR_ROWS) if gemm == "onednn" else None
        self.weight: torch.Tensor | None = weight if self.packed is None or keep_weight else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`residual + x @ W^T (+ b)`, the sum fused into the GEMM."""
        if self.packed is None:
            if self.bias is None:
                return torch.addmm(residual, x, self.weight.t())
            return residual + F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
