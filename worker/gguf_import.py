"""Turn a `.gguf` file (llama.cpp's format, often quantized) into a Hugging Face-style model folder.

    convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("out"))         # float32 safetensors
    convert_gguf(Path("model.gguf"), Path("out"), dtype="bfloat16")

The folder is what both the Baton engine and vLLM load: `model.safetensors` (every tensor dequantized),
`config.json` (without the `quantization_config` transformers' GGUF reader adds: vLLM refuses
"quant_method gguf" for a folder of plain safetensors), `tokenizer.json`, `tokenizer_config.json` (special
tokens and the GGUF's chat template) and `generation_config.json`.

Reading and dequantizing is the `gguf` library's (`GGUFReader`, `gguf.quants.dequantize`); the config and the
tokenizer come from transformers' GGUF support (`AutoConfig`/`AutoTokenizer` with `gguf_file=`). What is done
here: refusing what cannot be converted (an architecture the Baton engine does not run, a tensor type the
`gguf` library cannot dequantize, an unexpected tensor) before any heavy work, with one line naming it; GGUF
tensor names -> Hugging Face names (the `gguf` library's own name map); and undoing the Q/K row permutation
llama.cpp applies to Llama-architecture attention weights (for its rotary-embedding layout).

`baton model fetch --uri ...model.gguf` and `baton model smollm2` use it. Failures raise
`model_fetch.FetchError` (the one-line error of `baton model fetch`).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baton.worker.model_fetch import PROGRESS_INTERVAL_SECONDS, FetchError, human, make_readable_by_all

GGUF_SUFFIX = ".gguf"
DTYPES = ("float32", "bfloat16")
#: GGUF `general.architecture` -> (config.json architectures[0], whether llama.cpp permuted Q/K rows)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),  # Mistral GGUFs say "llama" too
    "qwen2": ("Qwen2ForCausalLM", False),
}
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class GGUFInfo:
    """What `inspect_gguf` learnt from the file's header (no tensor data read)."""

    architecture: str  # the GGUF's general.architecture
    hf_architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tensor_types: dict[str, int]  # type name -> number of tensors
    num_tensors: int
    name_map: dict[str, str]  # GGUF tensor name -> Hugging Face name


def _say_default(line: str) -> None:
    print(f"baton model: {line}", file=sys.stderr, flush=True)


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise FetchError("reading a .gguf file needs the `gguf` package; install baton[worker]") from None
    return gguf


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _open(path: Path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise FetchError(f"{path} does not exist") from None
    except PermissionError:
        raise FetchError(f"cannot read {path}: permission denied") from None
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise FetchError(f"{path.name} is not a readable GGUF file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dequantizable(qtype) -> bool:
    """The `gguf` library can dequantize this tensor type (tried on one zero block: no private tables read)."""
    import numpy as np

    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
    if not size:
        return False
    try:
        out = gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return False
    return np.issubdtype(out.dtype, np.floating) and out.size == block


def _hf_names(num_layers: int, tied: bool) -> list[str]:
    names = ["model.embed_tokens", "model.norm"] + ([] if tied else ["lm_head"])
    for n in range(num_layers):
        names += [f"model.layers.{n}.{part}" for part in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names


def inspect_gguf(path: Path, reader=None) -> GGUFInfo:
    """Check that `path` can be converted (architecture, tensor types, tensor names); raise FetchError if not."""
    gguf = _gguf()
    reader = reader if reader is not None else _open(path)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise FetchError(f"{path.name} is not a model GGUF (no general.architecture)")
    if arch not in ARCHITECTURES:
        raise FetchError(f"{path.name}: unsupported GGUF architecture {arch!r}; the Baton engine converts "
                         f"{', '.join(ARCHITECTURES)}")
    hf_arch, _ = ARCHITECTURES[arch]
    try:
        layers = int(_field(reader, f"{arch}.block_count"))
        heads = int(_field(reader, f"{arch}.attention.head_count"))
        kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    except (TypeError, ValueError):
        raise FetchError(f"{path.name}: the GGUF lacks {arch}.block_count or {arch}.attention.head_count") \
            from None
    types: dict[str, int] = {}
    verdict: dict[int, bool] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype not in verdict:
            verdict[qtype] = _dequantizable(qtype)
        if not verdict[qtype]:
            raise FetchError(f"{path.name}: tensor {tensor.name} has the GGUF tensor type {qtype.name}, which "
                             "cannot be dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                             "the K-quants and most IQ types)")
        types[qtype.name] = types.get(qtype.name, 0) + 1
    present = {t.name for t in reader.tensors}
    tied = "output.weight" not in present
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, layers)
    name_map: dict[str, str] = {}
    for hf in _hf_names(layers, tied):
        base = table.get_name(hf)
        if base is None:  # pragma: no cover - the gguf library maps every Llama-family name
            raise FetchError(f"the gguf library has no GGUF name for {hf}")
        for suffix in (".weight", ".bias"):
            name_map[base + suffix] = hf + suffix
    unknown = sorted(present - set(name_map))
    if unknown:
        raise FetchError(f"{path.name}: unsupported tensor {unknown[0]} in a {arch} GGUF"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                         + (" (Llama 3 rope scaling is not converted)" if "rope_freqs.weight" in unknown else ""))
    missing = [g for g, hf in name_map.items() if g.endswith(".weight") and g not in present]
    if missing:
        raise FetchError(f"{path.name}: the GGUF lacks the tensor {missing[0]} ({name_map[missing[0]]})")
    return GGUFInfo(arch, hf_arch, layers, heads, kv_heads, types, len(reader.tensors),
                    {g: hf for g, hf in name_map.items() if g in present})


def unpermute(weights, n_head: int):
    """Undo llama.cpp's `permute` of Q/K rows (its rotary layout: pairs interleaved -> halves). numpy in/out."""
    rows = weights.shape[0]
    dim = rows // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def clean_config(config: dict, hf_architecture: str, dtype: str) -> dict:
    """config.json as vLLM and the Baton engine want it: no GGUF quantization_config, a plain dtype."""
    out = {k: v for k, v in config.items()
           if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "torch_dtype", "dtype",
                        "transformers_version")}
    out["architectures"] = [hf_architecture]
    out["torch_dtype"] = dtype  # transformers < 5 and vLLM read this name, transformers 5 reads either
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in out:
        out["rope_theta"] = rope["rope_theta"]  # readers that predate rope_parameters default to 10000
    return out


def _dequantize_all(reader, info: GGUFInfo, dtype: str, say: Callable[[str], None]) -> dict:
    import numpy as np
    import torch

    gguf = _gguf()
    _, permuted = ARCHITECTURES[info.architecture]
    target = torch.float32 if dtype == "float32" else torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    started = last = time.monotonic()
    params = 0
    for i, tensor in enumerate(reader.tensors, 1):
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        hf = info.name_map[tensor.name]
        if permuted and ".self_attn.q_proj." in hf:
            weights = unpermute(weights, info.num_heads)
        elif permuted and ".self_attn.k_proj." in hf:
            weights = unpermute(weights, info.num_kv_heads)
        tensors[hf] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True)).to(target)
        params += weights.size
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_SECONDS:
            last = now
            say(f"dequantizing: {i}/{info.num_tensors} tensors ({100 * i // info.num_tensors}%)")
    say(f"dequantized {info.num_tensors} tensors ({params / 1e6:.0f}M parameters) in "
        f"{time.monotonic() - started:.1f}s")
    return tensors


def _write_tokenizer(src_dir: Path, name: str, out: Path, chat_template: str | None,
                     max_length: int | None) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=name)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    jinja = out / "chat_template.jinja"
    template = chat_template or cfg.get("chat_template") or (jinja.read_text() if jinja.is_file() else None)
    if template:
        cfg["chat_template"] = template  # one place for it: tokenizer_config.json (every reader looks there)
    jinja.unlink(missing_ok=True)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # understood by transformers 4 and 5 alike
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, key, None)
        if isinstance(value, str):
            cfg[key] = value
    for key in ("gguf_file", "is_local", "local_files_only"):  # how it was read, not what it is
        cfg.pop(key, None)
    if max_length:
        cfg["model_max_length"] = max_length
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_path: Path, out: Path, *, dtype: str = "float32",
                 say: Callable[[str], None] | None = None) -> Path:
    """Write the model folder for `gguf_path` into `out` (created; must not hold a model). Raises FetchError."""
    say = say or _say_default
    if dtype not in DTYPES:
        raise FetchError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gguf_path = Path(gguf_path)
    reader = _open(gguf_path)
    info = inspect_gguf(gguf_path, reader)
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    say(f"converting {gguf_path.name} ({human(gguf_path.stat().st_size)}; {info.architecture}, "
        f"{info.num_layers} layers; tensors: {kinds}) to {dtype} safetensors")
    try:
        from safetensors.torch import save_file
        from transformers import AutoConfig
    except ModuleNotFoundError as exc:
        raise FetchError(f"converting a .gguf file needs {exc.name}; install baton[worker]") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # transformers wants a folder and a file name in it; a link keeps the (possibly large) file where it is
    with tempfile.TemporaryDirectory(prefix=".baton-gguf-", dir=out) as tmp:
        link = Path(tmp) / "model.gguf"
        try:
            link.symlink_to(gguf_path.resolve())
        except OSError:
            shutil.copyfile(gguf_path, link)
        started = time.monotonic()
        try:
            config = AutoConfig.from_pretrained(tmp, gguf_file=link.name).to_diff_dict()
            _write_tokenizer(Path(tmp), link.name, out, _field(reader, "tokenizer.chat_template"),
                             config.get("max_position_embeddings"))
        except (ValueError, KeyError, OSError) as exc:
            raise FetchError(f"{gguf_path.name}: cannot read its config or tokenizer ({_first_line(exc)})") \
                from None
        say(f"config and tokenizer read in {time.monotonic() - started:.1f}s")
    config = clean_config(config, info.hf_architecture, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = _dequantize_all(reader, info, dtype, say)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    say(f"writing {WEIGHTS_FILE} ({human(size)})")
    started = time.monotonic()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    say(f"wrote {WEIGHTS_FILE} in {time.monotonic() - started:.1f}s")
    make_readable_by_all(out)
    return out


def fetch_gguf(downloader, source, staging: Path, dtype: str) -> Path:
    """`baton model fetch` of a .gguf URI: download it into `staging` (a file:// one is read where it is), convert
    it into `staging`/model and return that folder."""
    import urllib.parse
    import urllib.request

    if source.scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source.url).path))
        if not path.is_file():
            raise FetchError(f"the GGUF file {source.display} does not exist")
    else:
        path = staging / "model.gguf"
        downloader.get(source.url, path, "the GGUF file")
    root = staging / "model"
    convert_gguf(path, root, dtype=dtype, say=downloader.say)
    if path.parent == staging:
        path.unlink()
    return root
