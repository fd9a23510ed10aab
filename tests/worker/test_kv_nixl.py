"""The NIXL KV transport (UCX over TCP here), and its clean failure when NIXL is missing."""
from __future__ import annotations

import asyncio
import builtins
import os

import pytest
from baton.worker.engine.engine import BatonEngine
from baton.worker.engine.types import GenerationRequest, KVTransferFailed, SamplingParams
from baton.worker.kv import factory
from baton.worker.kv import nixl as nixlmod
from baton.worker.kv.params_auth import ParamsAuth

from .test_engine import GREEDY, TEXTS, collect, req
from .test_kv_tcp import settle

os.environ.setdefault("UCX_TLS", "tcp")  # what a node without an RDMA NIC gets; read when an agent starts

needs_nixl = pytest.mark.skipif(nixlmod.unavailable_reason() is not None,
                                reason=f"NIXL not usable: {nixlmod.unavailable_reason()}")


def nixl(**kw):
    return nixlmod.NIXLKVTransport("127.0.0.1", 0, bind_host="127.0.0.1", secret="s", **kw)


@needs_nixl
async def test_nixl_disagg_equals_both(tiny_model_dir):
    both = BatonEngine.load(tiny_model_dir)
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=nixl())
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=nixl(serve=False))
    async with both, pre, dec:
        prompts = [both.tokenizer.encode(t) for t in TEXTS]

        async def one(i, p):
            _, _, outs = await collect(pre, req(f"n{i}", p, max_tokens=8, **GREEDY))
            kv = outs[-1].kv_transfer_params
            r = GenerationRequest(f"n{i}", p, SamplingParams(max_tokens=8, **GREEDY), kv_transfer_params=kv)
            return (await collect(dec, r))[0]

        got = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        want = await asyncio.gather(*[collect(both, req(f"b{i}", p, max_tokens=8, **GREEDY))
                                      for i, p in enumerate(prompts)])
        assert got == [w[0] for w in want]
        await settle(pre, dec)
        s = dec.stats()
        assert s.kv_transport == "ucx-tcp" and s.kv_transfers_total == len(prompts)
        assert pre.stats().num_kv_leases == 0


@needs_nixl
async def test_nixl_auth_mismatch(tiny_model_dir):
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=nixl())
    bad = nixlmod.NIXLKVTransport("127.0.0.1", 0, secret="other", serve=False)
    # the params check gets the prefill's key, so the transport's own handshake is what refuses (with its own
    # key the decode engine refuses the params before connecting: tests/worker/test_kv_params_auth.py)
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=bad, kv_params_auth=ParamsAuth("s"))
    async with pre, dec:
        ids = pre.tokenizer.encode("Hello there")
        _, _, outs = await collect(pre, req("a", ids, max_tokens=4, **GREEDY))
        r = GenerationRequest("a", ids, SamplingParams(max_tokens=4, **GREEDY),
                              kv_transfer_params=outs[-1].kv_transfer_params)
        with pytest.raises(KVTransferFailed, match="BATON_KV_SECRET differs"):
            await collect(dec, r)
        await settle(dec)


@needs_nixl
def test_auto_picks_nixl_when_it_works():
    t = factory.make_transport("auto", role="decode", host="127.0.0.1", port=0)
    assert t.name == "nixl" and t.transport in ("ucx-tcp", "rdma")


def test_missing_nixl_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_nixl(name, *args, **kwargs):
        if name == "nixl" or name.startswith("nixl."):
            raise ImportError("No module named 'nixl'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nixl)
    nixlmod.unavailable_reason.cache_clear()
    try:
        with pytest.raises(nixlmod.NIXLUnavailable, match="NIXL is not installed.*pip install nixl-cu12"):
            factory.make_transport("nixl", role="prefill", port=0)
        t = factory.make_transport("auto", role="decode", port=0)  # falls back to TCP
        assert t.name == "tcp" and t.transport == "tcp"
        with pytest.raises(nixlmod.NIXLUnavailable):
            nixlmod.NIXLKVTransport("127.0.0.1", 0)
    finally:
        nixlmod.unavailable_reason.cache_clear()


def test_ucx_transport_label(monkeypatch, tmp_path):
    monkeypatch.setenv("UCX_TLS", "tcp")
    assert nixlmod.ucx_transport() == "ucx-tcp"
