"""Prefill/decode disaggregation over the in-process KV transport."""
from __future__ import annotations

import asyncio

import pytest
from baton.worker.engine.engine import BatonEngine
from baton.worker.engine.types import GenerationRequest, KVTransferFailed, SamplingParams
from baton.worker.kv.inprocess import InProcessKVTransport, InProcessRegistry

from .test_engine import GREEDY, TEXTS, assert_all_free, collect, req


@pytest.fixture
async def trio(tiny_model_dir):
    registry = InProcessRegistry()
    both = BatonEngine.load(tiny_model_dir)
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry),
                           kv_lease_seconds=30)
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=InProcessKVTransport(registry))
    for e in (both, pre, dec):
        await e.start()
    yield both, pre, dec
    for e in (both, pre, dec):
        await e.stop()


async def disagg(pre, dec, rid, ids, **sampling):
    p_tokens, _, p_outs = await collect(pre, req(rid, ids, **sampling))
    final = p_outs[-1]
    assert final.finished and len(p_tokens) == 1
    kv = final.kv_transfer_params
    r = GenerationRequest(rid, ids, SamplingParams(**sampling), kv_transfer_params=kv)
    return await collect(dec, r), kv


async def test_prefill_then_decode_equals_both(trio):
    both, pre, dec = trio
    prompts = [both.tokenizer.encode(t) for t in TEXTS]

    async def one(i, p):
        (tokens, text, outs), kv = await disagg(pre, dec, f"d{i}", p, max_tokens=10 + i, **GREEDY)
        assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
        assert kv["first_token_ids"] == tokens[:1]
        assert kv["num_prompt_tokens"] == len(p)
        assert len(kv["remote_block_ids"]) == -(-len(p) // 16)
        assert outs[0].token_ids == kv["first_token_ids"]  # the decode stream starts with the first token
        return tokens, text

    got = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    want = await asyncio.gather(*[collect(both, req(f"b{i}", p, max_tokens=10 + i, **GREEDY))
                                  for i, p in enumerate(prompts)])
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == [w[1] for w in want]
    await asyncio.sleep(0.05)
    assert pre.stats().num_kv_leases == 0  # released after the pull
    assert_all_free(pre)
    assert_all_free(dec)
    s = dec.stats()
    assert s.kv_transfers_total == len(prompts) and s.kv_transfer_bytes_total > 0
    assert s.kv_transport == "inprocess"


async def test_seeded_sampling_disagg_equals_both(trio):
    both, pre, dec = trio
    ids = both.tokenizer.encode("Once upon a time")
    params = {"max_tokens": 12, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    (tokens, _, _), _ = await disagg(pre, dec, "s", ids, **params)
    want, _, _ = await collect(both, req("s", ids, **params))
    assert tokens == want


async def test_both_role_honours_kv_transfer_params(tiny_model_dir):
    registry = InProcessRegistry()
    a = BatonEngine.load(tiny_model_dir, kv_transport=InProcessKVTransport(registry))
    b = BatonEngine.load(tiny_model_dir, kv_transport=InProcessKVTransport(registry))
    async with a, b:
        ids = a.tokenizer.encode("Hello there")
        _, _, outs = await collect(a, GenerationRequest("x", ids, SamplingParams(max_tokens=8, **GREEDY),
                                                        kv_transfer_params={"do_remote_decode": True}))
        kv = outs[-1].kv_transfer_params
        tokens, _, _ = await collect(b, GenerationRequest("x", ids, SamplingParams(max_tokens=8, **GREEDY),
                                                          kv_transfer_params=kv))
        want, _, _ = await collect(b, req("y", ids, max_tokens=8, **GREEDY))
        assert tokens == want


async def test_lease_expiry_frees_blocks(tiny_model_dir):
    registry = InProcessRegistry()
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry),
                           kv_lease_seconds=0.2)
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=InProcessKVTransport(registry))
    async with pre, dec:
        ids = pre.tokenizer.encode("The quick brown fox jumps over the lazy dog and then")
        _, _, outs = await collect(pre, req("e", ids, max_tokens=5, **GREEDY))
        kv = outs[-1].kv_transfer_params
        s = pre.stats()
        assert s.num_kv_leases == 1 and s.num_blocks_free == s.num_blocks_total - len(kv["remote_block_ids"])
        await asyncio.sleep(0.4)  # the engine is idle: it must wake up by itself to expire the lease
        assert pre.stats().num_kv_leases == 0
        assert_all_free(pre)
        with pytest.raises(KVTransferFailed, match="unknown|expired"):
            await collect(dec, GenerationRequest("e", ids, SamplingParams(max_tokens=5, **GREEDY),
                                                 kv_transfer_params=kv))
        assert_all_free(dec)


async def test_unreachable_prefill_engine(trio):
    _, pre, dec = trio
    ids = [0, 5, 6, 7]
    _, _, outs = await collect(pre, req("u", ids, max_tokens=3, **GREEDY))
    kv = dict(outs[-1].kv_transfer_params, remote_engine_id="gone")
    with pytest.raises(KVTransferFailed, match="not reachable"):
        await collect(dec, GenerationRequest("u", ids, SamplingParams(max_tokens=3, **GREEDY),
                                             kv_transfer_params=kv))
    assert_all_free(dec)


async def test_leases_hold_blocks_and_queue_new_prefills(tiny_model_dir):
    """A prefill worker whose cache is full of unpulled leases queues new requests until leases go."""
    registry = InProcessRegistry()
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry),
                           kv_lease_seconds=0.3, num_kv_blocks=4)
    async with pre:
        ids = list(range(3, 40))  # 3 blocks
        await collect(pre, req("a", ids, max_tokens=1, **GREEDY))
        assert pre.stats().num_blocks_free == 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        other = list(range(43, 80))  # another prompt (the same one would share a's cached blocks)
        _, _, outs = await collect(pre, req("b", other, max_tokens=1, **GREEDY))  # waits for "a" to expire
        assert loop.time() - t0 >= 0.2
        assert outs[-1].kv_transfer_params is not None
