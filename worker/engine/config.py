"""Model configuration: read a Hugging Face `config.json` into the few numbers the engine needs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .types import EngineError

#: architectures (config.json "architectures") -> model_type; all are the Llama decoder with small twists.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelLoadError(EngineError):
    """The model directory cannot be loaded (missing/corrupt files, shape mismatch)."""


def unreadable(path: Path, exc: OSError) -> ModelLoadError:
    """The error for a model file that cannot be opened; for permissions, who the process is and who may read."""
    if isinstance(exc, PermissionError):
        try:
            st = path.stat()
            owner = f"; the file is owned by uid {st.st_uid}, gid {st.st_gid}, mode {st.st_mode & 0o777:04o}"
        except OSError:
            owner = ""
        return ModelLoadError(f"cannot read {path}: permission denied (this process runs as uid {os.getuid()}, "
                              f"gid {os.getgid()}{owner})")
    return ModelLoadError(f"cannot read {path}: {exc.strerror or exc}")


class UnsupportedModel(ModelLoadError):
    """The model is valid but uses something this engine does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., "factor": ..., ...}; empty = default
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # what the weights are stored in (`dtype`; `torch_dtype` before transformers 5)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default") if self.rope_scaling else "default"


def _checkpoint_dtype(raw: dict) -> str | None:
    value = raw.get("dtype") or raw.get("torch_dtype")
    return value if isinstance(value, str) else None


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict) -> tuple[float, dict]:
    """(theta, scaling) from either the transformers<5 (`rope_theta` + `rope_scaling`) or >=5
    (`rope_parameters`) spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "default":
            scaling = {}
        elif "factor" not in scaling:
            raise ModelLoadError(f"config.json: rope scaling {rope_type!r} needs a 'factor'")
    return theta, scaling


def parse_model_config(raw: dict, source: str = "config.json") -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        model_type = raw.get("model_type")
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if not archs and model_type in by_type:
            arch = by_type[model_type]
        else:
            got = ", ".join(archs) or f"model_type={model_type!r}"
            raise UnsupportedModel(
                f"{source}: unsupported architecture {got}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        cfg_kwargs = {
            "vocab_size": int(raw["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(raw["intermediate_size"]),
            "num_layers": int(raw["num_hidden_layers"]),
            "num_heads": heads,
        }
    except KeyError as exc:
        raise ModelLoadError(f"{source}: missing required field {exc.args[0]!r}") from None
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({kv_heads})")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModel(f"{source}: hidden_act {act!r} is not supported (only silu)")
    # Sliding-window attention: Mistral v0.1 (4096) and Qwen2 with use_sliding_window. We refuse it unless the
    # window cannot matter (it is at least max_position_embeddings), instead of silently computing something else.
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if window is not None and int(window) < max_pos:
        raise UnsupportedModel(
            f"{source}: sliding-window attention (sliding_window={window}) is not supported by the Baton engine"
        )
    theta, scaling = _rope(raw)
    if raw.get("partial_rotary_factor", 1.0) != 1.0 or scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel(f"{source}: partial rotary embeddings are not supported")
    attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        checkpoint_dtype=_checkpoint_dtype(raw),
        **cfg_kwargs,
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{cfg_path} is missing (not a Hugging Face model directory?)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise unreadable(cfg_path, exc) from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    return parse_model_config(raw, source=str(cfg_path))
