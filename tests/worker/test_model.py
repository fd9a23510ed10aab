"""Model loading and numerics against Hugging Face transformers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from baton.worker.engine.batch import build_decode, build_prefill, build_step
from baton.worker.engine.config import (
    ModelLoadError,
    UnsupportedModel,
    load_model_config,
    parse_model_config,
)
from baton.worker.engine.kv_cache import PagedKVCache
from baton.worker.engine.model import LlamaModel
from baton.worker.engine.rope import inv_frequencies

from .conftest import hf_greedy

LOGITS_ATOL = 1e-4

PROMPTS = [[0, 5, 9, 33, 100, 7], list(range(3, 45)), [0, 3], [0] + list(range(200, 219))]


def _engine_greedy(model: LlamaModel, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    cfg = model.cfg
    cache = PagedKVCache(cfg.num_layers, 64, 16, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    tables = [cache.allocator.allocate(cache.blocks_for(len(p) + steps)) for p in prompts]
    fb = build_prefill(prompts, tables, 16)
    all_logits = model.forward(fb, cache.layers, all_logits=True)
    seqs = [list(p) for p in prompts]
    for i, t in enumerate(all_logits[fb.logits_index].argmax(-1).tolist()):
        seqs[i].append(t)
    for _ in range(steps - 1):
        fbd = build_decode([s[-1] for s in seqs], [len(s) for s in seqs], tables, 16, model.dtype)
        for i, t in enumerate(model.forward(fbd, cache.layers).argmax(-1).tolist()):
            seqs[i].append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)], all_logits


@pytest.mark.parametrize("gemm_kind", ["torch", "onednn"])
def test_logits_match_hf(tiny_model_dir, hf_model, gemm_kind):
    model = LlamaModel.from_pretrained(tiny_model_dir, gemm_kind=gemm_kind)
    assert model.gemm == gemm_kind
    _, logits = _engine_greedy(model, PROMPTS, 1)
    start = 0
    with torch.no_grad():
        for p in PROMPTS:
            ref = hf_model(torch.tensor([p])).logits[0]
            got = logits[start:start + len(p)]
            torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=0)
            start += len(p)


def test_decode_logits_match_hf(tiny_model_dir, hf_model):
    model = LlamaModel.from_pretrained(tiny_model_dir)
    prompts = PROMPTS[:2]
    outs, _ = _engine_greedy(model, prompts, 6)
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            full = p + out
            ref = hf_model(torch.tensor([full])).logits[0, len(p) - 1:-1]
            assert ref.argmax(-1).tolist() == out
    assert outs == [hf_greedy(hf_model, p, 6) for p in prompts]


@pytest.mark.parametrize("gemm_kind", ["torch", "onednn"])
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_match_hf(make_model, arch, gemm_kind):
    from transformers import AutoModelForCausalLM

    path = make_model(arch)
    cfg = load_model_config(path)
    assert cfg.model_type == arch
    if arch == "qwen2":
        assert cfg.attention_bias
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        hf.save_pretrained(path)
    model = LlamaModel.from_pretrained(path, gemm_kind=gemm_kind)
    outs, logits = _engine_greedy(model, PROMPTS[:3], 8)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    torch.testing.assert_close(logits[:len(PROMPTS[0])], ref, atol=LOGITS_ATOL, rtol=0)
    assert outs == [hf_greedy(hf, p, 8) for p in PROMPTS[:3]]


def test_sharded_weights_and_tied_embeddings(make_model, tiny_model_dir):
    sharded = make_model("llama", num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    a = LlamaModel.from_pretrained(sharded, gemm_kind="torch")  # torch: the plain weights stay readable
    b = LlamaModel.from_pretrained(tiny_model_dir, gemm_kind="torch")
    assert torch.equal(a.layers[1].down.weight, b.layers[1].down.weight)


def test_bfloat16_runs(tiny_model_dir):
    model = LlamaModel.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    outs, logits = _engine_greedy(model, PROMPTS[:2], 3)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(len(o) == 3 for o in outs)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_files(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaModel.from_pretrained(tmp_path / "nope")
    d = _copy(tiny_model_dir, tmp_path / "m1")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        LlamaModel.from_pretrained(d)
    d = _copy(tiny_model_dir, tmp_path / "m2")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        LlamaModel.from_pretrained(d)


def test_corrupt_safetensors(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        LlamaModel.from_pretrained(d)
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError):
        LlamaModel.from_pretrained(d)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        LlamaModel.from_pretrained(d)


def test_unsupported_architecture_and_features(tmp_path, tiny_model_dir):
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        parse_model_config({**raw, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        parse_model_config({**raw, "architectures": ["MistralForCausalLM"], "sliding_window": 16})
    with pytest.raises(UnsupportedModel, match="yarn"):
        parse_model_config({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({**raw, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UnsupportedModel, match="unsupported architecture FalconForCausalLM"):
        LlamaModel.from_pretrained(d)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=32,
                         rope_parameters={"rope_theta": 500000.0, **scaling})
    ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    # old (transformers<5) spelling in config.json must work too
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 32,
           "rope_theta": 500000.0, "rope_scaling": {**scaling, "type": scaling["rope_type"]}}
    cfg = parse_model_config(raw)
    torch.testing.assert_close(inv_frequencies(cfg), ref)


def _last_logits_whole(model, prompts):
    cfg = model.cfg
    cache = PagedKVCache(cfg.num_layers, 64, 16, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    tables = [cache.allocator.allocate(cache.blocks_for(len(p) + 1)) for p in prompts]
    return model.forward(build_prefill(prompts, tables, 16), cache.layers)


@pytest.mark.parametrize("cuts", [(16,), (5, 23), (1, 2, 40)])
def test_chunked_prefill_matches_whole_prompt(tiny_model_dir, cuts):
    """A prompt fed in chunks (each chunk attending to the keys earlier chunks left in the paged cache) gives
    the logits of the whole prompt, for one sequence and for several of different lengths in one step."""
    model = LlamaModel.from_pretrained(tiny_model_dir)
    cfg = model.cfg
    prompts = [list(range(3, 45)), [0] + list(range(200, 250)), [7, 8, 9] * 11]
    whole = _last_logits_whole(model, prompts)
    cache = PagedKVCache(cfg.num_layers, 64, 16, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    tables = [cache.allocator.allocate(cache.blocks_for(len(p) + 1)) for p in prompts]
    bounds = [0, *cuts]
    last = [None] * len(prompts)
    for a, b in zip(bounds, [*bounds[1:], 10 ** 9]):
        chunks = [(p[a:b], a, t) for p, t in zip(prompts, tables) if a < len(p)]
        owners = [i for i, p in enumerate(prompts) if a < len(p)]
        logits = model.forward(build_step([], chunks, 16, model.dtype), cache.layers)
        for i, row in zip(owners, logits):
            last[i] = row
    torch.testing.assert_close(torch.stack(last), whole, atol=LOGITS_ATOL, rtol=0)


def test_mixed_step_matches_separate_steps(tiny_model_dir):
    """Decode rows and a prefill chunk with context in ONE forward give what they give apart."""
    model = LlamaModel.from_pretrained(tiny_model_dir)
    outs, _ = _engine_greedy(model, PROMPTS[:2], 4)  # reference: prefill + 3 separate decode steps
    cfg = model.cfg
    cache = PagedKVCache(cfg.num_layers, 64, 16, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    tables = [cache.allocator.allocate(cache.blocks_for(len(p) + 4)) for p in PROMPTS[:2]]
    a, b = PROMPTS[0], PROMPTS[1]
    # step 1: all of A, first 20 tokens of B
    lg = model.forward(build_step([], [(a, 0, tables[0]), (b[:20], 0, tables[1])], 16, model.dtype), cache.layers)
    seq_a = a + [int(lg[0].argmax())]
    # step 2: A decodes while B's second chunk (with 20 tokens of context) completes its prompt
    lg = model.forward(build_step([(seq_a[-1], len(seq_a), tables[0])], [(b[20:], 20, tables[1])], 16,
                                  model.dtype), cache.layers)
    seq_a.append(int(lg[0].argmax()))
    seq_b = b + [int(lg[1].argmax())]
    # step 3: both decode
    lg = model.forward(build_step([(seq_a[-1], len(seq_a), tables[0]), (seq_b[-1], len(seq_b), tables[1])], [],
                                  16, model.dtype), cache.layers)
    seq_a.append(int(lg[0].argmax()))
    seq_b.append(int(lg[1].argmax()))
    assert seq_a[len(a):] == outs[0][:3]
    assert seq_b[len(b):] == outs[1][:2]
