"""The engine's GEMM choice (`worker/engine/gemm.py`): both kinds compute the same projection, the choice is
made from dtype/device/override, and a bad override is refused naming the variable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baton.worker.engine import gemm

needs_onednn = pytest.mark.skipif(not gemm._onednn_available(), reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_both_kinds_compute_the_same_projection(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 64, generator=g)
    residual = torch.randn(rows, 96, generator=g)
    want = F.linear(x, w, b)
    for kind in gemm.GEMMS:
        p = gemm.Projection(w, b, kind)
        with torch.inference_mode():
            torch.testing.assert_close(p(x), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(p.add_to(residual, x), residual + want, atol=1e-4, rtol=1e-4)
        assert p.shape == (96, 64) and p.numel == 96 * 64
        assert p.weight is (w if kind == "torch" else None)  # oneDNN: the model is not kept twice in memory
        assert gemm.Projection(w, b, kind, keep_weight=True).weight is w


def test_the_choice_follows_dtype_device_and_override(monkeypatch):
    monkeypatch.delenv(gemm.ENV, raising=False)
    auto = "onednn" if gemm._onednn_available() else "torch"
    assert gemm.choose(torch.float32) == auto
    assert gemm.choose(torch.bfloat16) == "torch"  # oneDNN bf16 wants AVX512-BF16/AMX: not chosen by default
    assert gemm.choose(torch.float32, "meta") == "torch"
    assert gemm.choose(torch.float32, requested="torch") == "torch"
    monkeypatch.setenv(gemm.ENV, "torch")
    assert gemm.choose(torch.float32) == "torch"
    monkeypatch.setenv(gemm.ENV, "mkl")
    with pytest.raises(ValueError, match="BATON_CPU_GEMM='mkl': expected one of torch, onednn"):
        gemm.choose(torch.float32)
    monkeypatch.setenv(gemm.ENV, "onednn")
    with pytest.raises(ValueError, match="needs float32 weights"):
        gemm.choose(torch.bfloat16)
