"""Fixtures for the engine tests: tiny random models created offline once per session."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from baton.worker.tiny import create_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (GQA), made through the real CLI command."""
    from baton.cli import main

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    assert main(["model", "tiny", str(path), "--seed", "0"]) == 0
    return path


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    cache = {}

    def make(arch: str = "llama", **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = f"tiny-{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
            cache[key] = create_tiny_model(tmp_path_factory.mktemp("models") / name, arch=arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate` greedy continuation of one prompt (no eos stop)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=hf.config.pad_token_id,
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture
async def engine(tiny_model_dir):
    """A started Baton engine (role both, 8 sequences) on the tiny model."""
    from baton.worker.engine.engine import BatonEngine

    eng = BatonEngine.load(tiny_model_dir, max_num_seqs=8)
    await eng.start()
    yield eng
    await eng.stop()


def hf_greedy_reference(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy tokens (fp32, no EOS stop) for a real model's prompts -- the reference the Baton
    engine (tests/worker/test_gguf_import.py) and vLLM (tests/worker/test_vllm.py) are held to -- computed once per
    model and code, not once per test process: on CI's 2 loaded cores SmolLM2's 5 x 64 tokens take minutes, and
    the unit and vLLM phases both need them. Cached under `$BATON_CACHE/test-references/`, keyed by the weights'
    sha256, the transformers and torch versions, the prompt ids and the token count (any change recomputes)."""
    import transformers

    weights = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                weights.update(chunk)
    key = hashlib.sha256(json.dumps([weights.hexdigest(), transformers.__version__, torch.__version__, prompts,
                                     new_tokens]).encode()).hexdigest()[:32]
    from baton.worker.smollm2 import cache_root

    cached = cache_root().parent / "test-references" / f"hf-greedy-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = [hf_greedy(hf, p, new_tokens) for p in prompts]
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(tokens))
    os.replace(tmp, cached)  # two processes at once: both compute, either file is the same answer
    return tokens
