"""`baton model tiny`: the model directory looks like one from the hub."""
from __future__ import annotations

import json

from baton.cli import main


def test_tiny_model_layout(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] and tok_cfg["eos_token"] == "</s>"


def test_refuses_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["model", "tiny", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_deterministic(tmp_path, tiny_model_dir):
    out = tmp_path / "again"
    assert main(["model", "tiny", str(out), "--seed", "0"]) == 0
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
