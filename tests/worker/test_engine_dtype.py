"""bfloat16: `--dtype auto` picks it only where it pays, and bf16 greedy decoding agrees with HF in bf16."""
from __future__ import annotations

import pytest
import torch
from baton.worker.engine import engine as engine_module
from baton.worker.engine.config import parse_model_config
from baton.worker.engine.engine import BatonEngine, cpu_has_bf16, resolve_dtype

from .test_engine import GREEDY, collect, req

PROMPTS = [list(range(3, 45)), [0, 5, 9, 33, 100, 7], [0] + list(range(200, 219)), [7, 8, 9] * 20]
AMD = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_auto_dtype_needs_native_bf16_and_a_16_bit_checkpoint(monkeypatch):
    assert not cpu_has_bf16(AMD) and cpu_has_bf16(SAPPHIRE) and not cpu_has_bf16("")
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", "float16") is torch.bfloat16
    assert resolve_dtype("auto", "float32") is torch.float32  # a float32 checkpoint stays float32
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("float32", "bfloat16") is torch.float32
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "bfloat16") is torch.float32  # emulated bf16 is slower than fp32
    with pytest.raises(Exception, match="dtype must be auto or one of"):
        resolve_dtype("int8")
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert parse_model_config({**base, "torch_dtype": "bfloat16"}).checkpoint_dtype == "bfloat16"
    assert parse_model_config({**base, "dtype": "float32", "torch_dtype": "bfloat16"}).checkpoint_dtype == "float32"
    assert parse_model_config(base).checkpoint_dtype is None


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 0), (torch.bfloat16, 3)])
async def test_greedy_agrees_with_hf_in_the_same_dtype(tiny_model_dir, dtype, ulps):
    """Teacher-forced check: HF (same dtype) scores the engine's whole greedy continuation; every token the
    engine picked must be HF's best up to `ulps` bf16 rounding steps (logits here are ~+-2, one step 2**-6).
    Exact token equality is not a fair bf16 test: the random tiny model has near-ties that bf16 rounding
    breaks either way in any two implementations. float32 must match exactly."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    eng = BatonEngine.load(tiny_model_dir, dtype=dtype)
    tol = ulps * 2.0 ** -6
    worst = 0.0
    async with eng:
        for i, p in enumerate(PROMPTS):
            toks, _, _ = await collect(eng, req(f"r{i}", p, max_tokens=24, **GREEDY))
            with torch.no_grad():
                logits = hf(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float()
            gap = logits.max(-1).values - logits[torch.arange(len(toks)), torch.tensor(toks)]
            worst = max(worst, float(gap.max()))
    assert worst <= tol, f"the engine picked a token {worst:.4f} below HF's best ({dtype})"
