"""A Baton worker's KV-layout fingerprint (`worker/engine/fingerprint.py`, issue 23): equal for equal settings,
different when the model, dtype, KV block size or anything else that shapes the KV changes; the engine computes
it once and the worker's /ready reports it (body and header)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
from baton.worker.engine import fingerprint as fp

from baton import launch

pytest.importorskip("torch")

BASE = fp.KVLayout(engine="baton", engine_version="0.1.0", model="m1", dtype="float32", block_size=16,
                   tensor_parallel=1, num_layers=2, num_kv_heads=2, head_dim=16)


def test_equal_layouts_equal_fingerprints():
    assert fp.fingerprint(BASE) == fp.fingerprint(dataclasses.replace(BASE))
    assert fp.fingerprint(BASE).startswith(f"kv{fp.FINGERPRINT_VERSION}-")


@pytest.mark.parametrize("change", [
    {"dtype": "bfloat16"}, {"block_size": 8}, {"model": "m2"}, {"engine_version": "0.2.0"},
    {"tensor_parallel": 2}, {"num_layers": 3}, {"num_kv_heads": 4}, {"head_dim": 32}, {"engine": "other"},
])
def test_any_change_changes_the_fingerprint(change):
    assert fp.fingerprint(dataclasses.replace(BASE, **change)) != fp.fingerprint(BASE)


def test_model_identity_follows_config_and_weights_not_the_folder(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    assert fp.model_identity(a) == fp.model_identity(b) == fp.model_identity(tiny_model_dir)
    cfg = json.loads((b / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3  # another revision of the config
    (b / "config.json").write_text(json.dumps(cfg))
    assert fp.model_identity(b) != fp.model_identity(a)
    weights = next(a.glob("*.safetensors"))
    with weights.open("ab") as f:  # other weights: another size
        f.write(b"\0" * 8)
    assert fp.model_identity(a) != fp.model_identity(tiny_model_dir)


def test_engine_fingerprint_changes_with_dtype_and_block_size(tiny_model_dir):
    from baton.worker.engine.engine import BatonEngine

    def fingerprint(**kw) -> str:
        return BatonEngine.from_pretrained(tiny_model_dir, **{"role": "prefill", "num_kv_blocks": 8, **kw}
                                           ).kv_fingerprint

    base = fingerprint(dtype="float32")
    assert base == fingerprint(dtype="float32")  # equal settings, another engine (another engine_id)
    assert base == fingerprint(dtype="float32", role="decode")  # the role is not part of the layout
    assert base != fingerprint(dtype="float32", block_size=8)
    assert base != fingerprint(dtype="bfloat16")
    engine = BatonEngine.from_pretrained(tiny_model_dir, dtype="float32", num_kv_blocks=8)
    assert engine.kv_layout.block_size == 16 and engine.kv_layout.dtype == "float32"
    assert engine.kv_layout.num_layers == engine.model.cfg.num_layers
    assert engine.kv_layout.model == fp.model_identity(tiny_model_dir)


def test_ready_reports_the_fingerprint(tiny_model_dir):
    from baton.worker.engine.engine import BatonEngine
    from baton.worker.server import create_app
    from starlette.testclient import TestClient

    engine = BatonEngine.from_pretrained(tiny_model_dir, dtype="float32", num_kv_blocks=8, block_size=8)
    with TestClient(create_app(engine, served_model_name="tiny")) as client:
        deadline = time.monotonic() + 30
        while (r := client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        body = r.json()
        assert body[launch.READY_KV_FINGERPRINT] == engine.kv_fingerprint
        assert r.headers[launch.Header.KV_FINGERPRINT] == engine.kv_fingerprint
        assert body[launch.READY_KV_LAYOUT]["block_size"] == 8
