"""Tokenizer wrapper: special tokens, chat template, incremental detokenization."""
from __future__ import annotations

import pytest
from baton.worker.engine.tokenizer import ChatTemplateError, HFTokenizer, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return HFTokenizer(tiny_model_dir)


def test_special_tokens(tok):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.eos_token_ids == (tok._tok.token_to_id("</s>"),)
    assert tok.decode(ids) == "Hello world"


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|user|>\nHi</s>\n<|assistant|>\n"
    assert not tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False) \
        .endswith("<|assistant|>\n")


def test_chat_template_raise_exception(tok):
    tok2 = HFTokenizer.__new__(HFTokenizer)
    tok2.__dict__.update(tok.__dict__)
    tok2.chat_template = "{{ raise_exception('only user messages') }}"
    tok2._compiled = None
    with pytest.raises(ChatTemplateError, match="only user messages"):
        tok2.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("text", ["Hello there, how are you?", "Café naïve 東京 😀 🚀 — über", "a  b   c\n\nd"])
def test_incremental_detokenization_equals_full_decode(tok, text):
    prompt = tok.encode("Once upon a time")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_incremental_detokenization_long(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add(t) for t in ids) == tok.decode(ids)
