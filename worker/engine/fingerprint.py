"""A worker's KV-layout fingerprint: what must be equal for a decode worker to use a prefill worker's KV cache.

A KV cache handed from a prefill worker to a decode worker is only meaningful when both computed it the same
way and lay it out the same way: the same engine (and version: its wire format and block layout), the same model
(weights and config: another revision gives other K/V), the same dtype, KV block size, tensor-parallel layout and
cache shape (layers, KV heads, head dim). A rollout that changes any of these runs old and new workers side by
side; the router pairs a prefill worker only with decode workers of the same fingerprint (`worker/router/
pairing.py`), so no KV ever crosses layouts.

Each Baton worker computes its fingerprint once, when its engine is built, and reports it in its `/ready` body
(`launch.READY_KV_FINGERPRINT`, with the parts under `launch.READY_KV_LAYOUT`) and the `launch.Header.
KV_FINGERPRINT` header. Pure functions; `model_identity` only stats and reads the model folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

#: bump when what goes into the fingerprint changes meaning (old and new routers then never mix their values)
FINGERPRINT_VERSION = 1
#: the files whose names and sizes identify a model's weights (with config.json's bytes)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.gguf", "*.pt")


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Everything that decides whether a KV cache computed by one worker is valid, as is, in another."""

    engine: str  # "baton"
    engine_version: str
    model: str  # `model_identity` (or `config_identity` when the engine was built without a model folder)
    dtype: str  # the KV cache's dtype, e.g. "float32"
    block_size: int  # tokens per KV block
    tensor_parallel: int  # how the KV heads are split over devices
    num_layers: int
    num_kv_heads: int
    head_dim: int


def fingerprint(layout: KVLayout) -> str:
    """A short, stable digest of `layout`: equal layouts give equal fingerprints, any difference another one."""
    text = json.dumps({"v": FINGERPRINT_VERSION, **dataclasses.asdict(layout)}, sort_keys=True,
                      separators=(",", ":"))
    return f"kv{FINGERPRINT_VERSION}-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:20]


def model_identity(model_dir: str | Path) -> str:
    """The identity of the model in `model_dir`: config.json's bytes and the names and sizes of its weight files
    (reading the weights themselves would cost a pass over gigabytes at every start; a new revision changes
    config.json or a file's size in practice, and its folder or file names usually)."""
    path = Path(model_dir)
    parts: list[bytes] = []
    try:
        parts.append((path / "config.json").read_bytes())
    except OSError:
        parts.append(b"")
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})
    for f in files:
        parts.append(f"{f.name}\0{f.stat().st_size}".encode())
    return _digest(parts)


def config_identity(config: object) -> str:
    """The identity of a model known only by its parsed config (a dataclass): an engine built in memory."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)
    return _digest([json.dumps(fields, sort_keys=True, default=str).encode()])


def dtype_name(dtype: object) -> str:
    """`torch.float32` -> "float32"; strings pass through."""
    return str(dtype).removeprefix("torch.")
