"""Load and check safetensors weights (single file or sharded with `model.safetensors.index.json`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig, ModelLoadError, unreadable

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, by its Hugging Face name, with its shape."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,),
                           p + "mlp.down_proj.bias": (h,)})
    return shapes


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelLoadError(f"{model_dir} holds only PyTorch pickle weights (*.bin); the Baton engine loads "
                             "safetensors only (convert with transformers' save_pretrained(safe_serialization=True))")
    raise ModelLoadError(f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} with shards")


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read every needed tensor, check names and shapes, convert to `dtype`. Extra tensors are ignored."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    want = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:  # safetensors reports any failure to open as "No such file or directory": ask the OS first
            open(path, "rb").close()
        except OSError as exc:
            raise unreadable(path, exc) from None
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    if name not in want:
                        continue
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != want[name]:
                        raise ModelLoadError(
                            f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want[name]} "
                            f"from config.json"
                        )
                    out[name] = tensor.to(dtype)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from None
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
    missing = [n for n in want if n not in out]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"weights in {model_dir} lack tensor(s) {', '.join(missing[:3])}{more}")
    return out
