"""Tokenizer: `tokenizers` (tokenizer.json) + tokenizer_config.json (special tokens, chat template).

Chat templates are rendered with jinja2 the way transformers does it (sandboxed, trim_blocks, lstrip_blocks,
`raise_exception`, `tojson`, `strftime_now`). `IncrementalDetokenizer` turns a growing list of token ids into
text deltas without ever emitting half of a multi-byte character.
"""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from pathlib import Path

from .config import ModelLoadError


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its `raise_exception`) or failed to render."""


class HFTokenizer:
    """Implements the `types.Tokenizer` protocol."""

    def __init__(self, model_dir: str | Path, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{tok_file} is missing (the Baton engine needs a fast tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ModelLoadError(f"{tok_file} cannot be loaded: {exc}") from None
        cfg: dict = {}
        cfg_file = model_dir / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from None
        self.config = cfg
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos: list[int] = []
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos.append(self._tok.token_to_id(self.eos_token))
        gen_file = model_dir / "generation_config.json"
        if gen_file.is_file():
            try:
                gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                gen_eos = None
            if isinstance(gen_eos, int):
                gen_eos = [gen_eos]
            eos.extend(int(t) for t in gen_eos or [])
        eos.extend(extra_eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self._compiled = None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        decoder = json.loads(tok_file.read_text()).get("decoder") if tok_file.stat().st_size < 64 << 20 else None
        self._byte_level = isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
        self._byte_tables: dict[bool, list[bytes] | None] = {}

    # -- the Tokenizer protocol -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json 'chat_template')")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        special = {k: _token_content(v) for k, v in self.config.items()
                   if k.endswith("_token") and isinstance(v, (str, dict))}
        context = {**special, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **context)
        except ChatTemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - any error inside a user template
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def byte_table(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """The bytes each token id decodes to, when decoding is a plain concatenation of per-token bytes
        followed by UTF-8 (a `ByteLevel` decoder, GPT-2 style); None otherwise. Checked against the real
        decoder for every id once, so the fast incremental detokenizer can never disagree with `decode`."""
        if skip_special_tokens not in self._byte_tables:
            self._byte_tables[skip_special_tokens] = self._build_byte_table(skip_special_tokens)
        return self._byte_tables[skip_special_tokens]

    def _build_byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        if not self._byte_level:
            return None
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        n = self.vocab_size
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        table: list[bytes] = []
        for i in range(n):
            tok = self._tok.id_to_token(i)
            if tok is None or (skip_special_tokens and i in special):
                table.append(b"")
                continue
            table.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in tok))
        try:
            expected = self._tok.decode_batch([[i] for i in range(n)], skip_special_tokens=skip_special_tokens)
        except Exception:  # noqa: BLE001 - be conservative: fall back to the generic method
            return None
        for b, text in zip(table, expected, strict=True):
            if b.decode("utf-8", "replace") != text:
                return None
        return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


class IncrementalDetokenizer:
    """Text deltas for a growing token list, equal to decoding everything at once, never emitting half of a
    multi-byte character.

    Byte-level tokenizers (GPT-2/Llama 3/Qwen style, see `HFTokenizer.byte_table`) take a fast path: each token
    is a table lookup feeding an incremental UTF-8 decoder (incomplete sequences are held back until
    completed). Others use the vLLM prefix/read-offset method: decode a small window `ids[prefix:]`, compare
    it with `ids[prefix:read]` (spaces, merges), and hold back text ending in U+FFFD.
    """

    __slots__ = ("_bytes", "_ids", "_prefix", "_read", "_tok", "_utf8", "add", "skip_special_tokens")

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 context: int = 5) -> None:
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        table = tokenizer.byte_table(skip_special_tokens) if hasattr(tokenizer, "byte_table") else None
        if table is not None:
            self._bytes = table
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            # a prompt ending inside a multi-byte character: its first bytes wait in the decoder
            self._utf8.decode(b"".join(table[t] for t in prompt_ids[-4:]))
            self.add = self._add_bytes
            return
        self._ids = list(prompt_ids[-context:])
        self._prefix = 0
        self._read = len(self._ids)
        self.add = self._add_window

    def _add_bytes(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes[token_id])

    def _add_window(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tok.decode
        prefix_text = decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        full = decode(self._ids[self._prefix:], self.skip_special_tokens)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix > 32:  # ids before the prefix are never decoded again
                del self._ids[:self._prefix]
                self._read -= self._prefix
                self._prefix = 0
            return delta
        return ""
