"""Fixtures for the engine tests: tiny random models created offline once per session."""
from __future__ import annotations

import os

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
