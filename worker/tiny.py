"""Create small random Llama-family models offline (tests, demos, benchmarks).

`baton model tiny PATH` writes a directory that looks exactly like a model from the Hugging Face hub:
`config.json`, `model.safetensors` (or shards), `generation_config.json`, `tokenizer.json` and
`tokenizer_config.json` with a chat template. The weights are random (seeded), the tokenizer is a real
byte-level BPE trained on a small built-in English corpus, so nothing needs the network.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: tiny: head_dim 16 (Baton's tests); small: head_dim 64, the smallest shape vLLM's CPU attention accepts
#: (head sizes 32, 64, 80, ...); 100m: ~100M parameters (benchmarks)
SIZES = ("tiny", "small", "100m")
ARCHS = ("llama", "qwen2", "mistral")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village by the sea, where fishermen went out every morning and came
back every evening with boats full of silver fish. The children played on the beach and the old people
told stories about storms, ships and distant islands.
Large language models are trained to predict the next token. Serving them well means batching many requests
together, keeping the key and value cache in memory and moving it between machines when prefill and decode
run on different GPUs. Latency matters: the time to the first token and the time per output token.
Kubernetes runs containers in pods. A deployment keeps a number of replicas running, a service gives them a
stable address, and an operator watches custom resources and makes the cluster match what they describe.
Hello! How are you today? I am fine, thank you. What is your name? My name is Baton. Where do you live?
I live in a data center, close to many other computers. What time is it? It is twelve o'clock.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday.
The weather is nice: the sun is shining, the sky is blue and the birds are singing in the trees.
Please write a short poem about the ocean. The ocean is deep and wide, it moves with the tide.
Water boils at one hundred degrees Celsius. The earth goes around the sun in about three hundred and
sixty five days. Light travels faster than sound, which is why we see lightning before we hear thunder.
Café, naïve, résumé, über, 東京, 北京, Москва, 😀 🚀 — unicode text also exists and must round-trip.
"""


def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    del seed  # BPE training is deterministic for a fixed corpus
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _model_config(arch: str, size: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if size == "tiny":
        dims = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 1024, "initializer_range": 0.1}
    elif size == "small":  # vLLM CPU (head_dim 64): 4 layers, 2.6M parameters, 10 MB
        dims = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
                    "initializer_range": 0.1}
    elif size == "100m":
        dims = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_key_value_heads": 4, "max_position_embeddings": 2048, "initializer_range": 0.02}
    else:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, **dims)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def ensure_tiny_model(path: str | os.PathLike, size: str = "tiny") -> Path:
    """`path` when it already holds a model (its config.json), else a new random `size` model created there
    (saying so on stderr: the 100m one takes a while). For benchmarks that reuse a --model-dir."""
    out = Path(path)
    if not (out / "config.json").is_file():
        print(f"creating the {size} model in {out} ...", file=sys.stderr, flush=True)
        create_tiny_model(out, size=size)
    return out


#: what a benchmark's --size/--models may name: the random sizes it makes, or the real SmolLM2
BENCHMARK_MODELS = ("tiny", "100m", "smollm2")


def ensure_benchmark_model(name: str, base: str | os.PathLike) -> Path:
    """A benchmark's model by name: `smollm2` is the real SmolLM2-135M-Instruct (from PyPI, converted once and
    cached: `baton model smollm2`), `tiny`/`100m` a random Llama made under `base/name` (kept there for reuse)."""
    if name == "smollm2":
        from baton.worker.smollm2 import ensure_smollm2

        return ensure_smollm2()
    return ensure_tiny_model(Path(base) / name, name)


def create_tiny_model(path: str | os.PathLike, *, size: str = "tiny", arch: str = "llama", seed: int = 0,
                      vocab_size: int | None = None, num_shards: int = 1) -> Path:
    """Write a random model + trained tokenizer to `path` and return it.

    `num_shards > 1` writes sharded safetensors with `model.safetensors.index.json`.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(vocab_size or (2048 if size == "100m" else 512), seed)
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    config = _model_config(arch, size, tok.get_vocab_size(), bos_id, eos_id, pad_id)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if num_shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        shard_kb = max(1, total // num_shards // 1024 + 1)
        model.save_pretrained(out, safe_serialization=True, max_shard_size=f"{shard_kb}KB")
    else:
        model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")

    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
    )
    return out
