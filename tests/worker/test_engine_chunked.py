"""Chunked prefill and prefix caching: greedy output unchanged (vs HF generate), steps within the token budget,
decodes never stalled by a long prompt, cached prefixes found, shared, evicted and freed exactly."""
from __future__ import annotations

import asyncio

import pytest
from baton.worker.engine.engine import BatonEngine
from baton.worker.engine.kv_cache import BlockAllocator, block_keys
from baton.worker.engine.sequence import Mode, Sequence
from baton.worker.engine.tokenizer import IncrementalDetokenizer
from baton.worker.kv.inprocess import InProcessKVTransport, InProcessRegistry

from .conftest import hf_greedy
from .test_engine import GREEDY, assert_all_free, collect, req

LONG = [list(range(3, 90)), [0] + list(range(100, 170)), list(range(200, 233)), [5, 6, 7, 8] * 15]


# -- the allocator ---------------------------------------------------------------------------------------------
def test_allocator_refcounts_cache_and_evict_least_recent():
    a = BlockAllocator(4)
    x = a.allocate(2)
    keys = block_keys(list(range(32)), 16)
    assert len(keys) == 2 and a.register(x[0], keys[0]) and a.register(x[1], keys[1])
    assert not a.register(x[1], keys[1])  # a key is cached once
    a.free(x)
    assert a.num_free == 4 and a.num_cached == 2  # unused cached blocks are free for allocation...
    hit = a.lookup(keys)
    assert hit == x  # ...and still found
    a.share(hit)
    assert a.num_free == 2 and a.refcount(x[0]) == 1
    a.share(hit[:1])
    a.free(hit)
    a.free(hit[:1])
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(hit[:1])
    # fresh blocks go first, then the least recently freed cached block (x[1] was freed before x[0])
    got = a.allocate(3)
    assert set(got[:2]) == set(range(4)) - set(x) and got[2] == x[1]
    assert a.lookup(keys) == [x[0]]  # the chain breaks where a block was evicted
    assert a.lookup(block_keys(list(range(1, 33)), 16)) == []


def test_block_keys_chain_the_whole_prefix():
    a, b = block_keys([1] * 16 + [2] * 16, 16), block_keys([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert block_keys([1] * 40, 16) == block_keys([1] * 32, 16)  # partial blocks have no key
    assert block_keys([1] * 16 + [2] * 16, 16, a[0], 1) == a[1:]


# -- chunked prefill -------------------------------------------------------------------------------------------
async def test_chunked_prefill_matches_hf_with_joins(tiny_model_dir, hf_model):
    """Long prompts cut into 16-token chunks join while others decode: every output is HF's greedy one, and no
    step computes more tokens than the budget."""
    eng = BatonEngine.load(tiny_model_dir, max_num_seqs=8, max_num_batched_tokens=16,
                           enable_prefix_caching=False)
    assert eng.chunked_prefill and eng.max_num_batched_tokens == 16
    expected = [hf_greedy(hf_model, p, 12) for p in LONG]
    biggest = 0
    run = eng.core._run

    def spy(plan, res):
        nonlocal biggest
        biggest = max(biggest, plan.num_tokens)
        return run(plan, res)

    eng.core._run = spy
    async with eng:
        first = asyncio.create_task(collect(eng, req("r0", LONG[0], max_tokens=12, **GREEDY)))
        await asyncio.sleep(0.05)
        rest = await asyncio.gather(*[collect(eng, req(f"r{i}", p, max_tokens=12, **GREEDY))
                                      for i, p in enumerate(LONG[1:], 1)])
        results = [await first, *rest]
        assert [r[0] for r in results] == expected
        assert_all_free(eng)
    assert biggest == 16


def _sequence(eng, rid, ids, max_tokens):
    r = req(rid, ids, max_tokens=max_tokens, **GREEDY)
    return Sequence(r, Mode.NORMAL, IncrementalDetokenizer(eng.tokenizer, ids), eng.eos_token_ids,
                    eng.max_model_len)


@pytest.mark.parametrize("chunked", [True, False])
def test_long_prompt_does_not_stall_running_decodes(tiny_model_dir, chunked):
    """Sarathi's point, counted in steps: while a 120-token prompt is prefilled in 16-token chunks, the running
    sequence gets a token in every step; without chunking that prompt takes a step of its own with no decode."""
    eng = BatonEngine.load(tiny_model_dir, max_num_seqs=8, max_num_batched_tokens=16,
                           enable_chunked_prefill=chunked, enable_prefix_caching=False)
    core = eng.core
    a = _sequence(eng, "a", [1, 2, 3], 40)
    core.incoming.append(a)
    core.step()
    core.step()
    assert len(a.output_ids) == 2
    b = _sequence(eng, "b", list(range(10, 130)), 2)
    core.incoming.append(b)
    steps_without_a = 0
    steps = 0
    while not b.output_ids:
        before = len(a.output_ids)
        core.step()
        steps += 1
        steps_without_a += len(a.output_ids) == before
    if chunked:
        assert steps_without_a == 0 and steps == -(-120 // 15)  # 15 prompt tokens beside a's decode row
    else:
        assert steps_without_a == 1 and steps == 1


# -- prefix caching --------------------------------------------------------------------------------------------
async def test_prefix_cache_hits_keep_outputs(tiny_model_dir, hf_model):
    eng = BatonEngine.load(tiny_model_dir, max_num_seqs=8)
    p = list(range(3, 73))  # 70 tokens: 4 full blocks
    q = p[:50] + [7, 7, 7, 7, 7]  # shares 3 full blocks with p
    async with eng:
        out1, _, _ = await collect(eng, req("a", p, max_tokens=10, **GREEDY))
        s1 = eng.stats()
        assert (s1.prefix_cache_queries_total, s1.prefix_cache_hits_total) == (70, 0)
        out2, _, _ = await collect(eng, req("b", p, max_tokens=10, **GREEDY))
        s2 = eng.stats()
        assert s2.prefix_cache_hits_total == 64  # 4 blocks; the 70th token is computed here
        out3, _, _ = await collect(eng, req("c", q, max_tokens=10, **GREEDY))
        assert eng.stats().prefix_cache_hits_total == 64 + 48
        exact = p[:64]  # a prompt of exactly 4 blocks reuses 3: its last token must be computed
        out4, _, _ = await collect(eng, req("d", exact, max_tokens=10, **GREEDY))
        assert eng.stats().prefix_cache_hits_total == 64 + 48 + 48
        assert_all_free(eng)
    assert out1 == out2 == hf_greedy(hf_model, p, 10)
    assert out3 == hf_greedy(hf_model, q, 10)
    assert out4 == hf_greedy(hf_model, exact, 10)


async def test_prefix_cache_shared_by_concurrent_requests_and_evicted(tiny_model_dir, hf_model):
    """Concurrent requests with one prefix share its blocks; a small cache evicts old prefixes for new prompts,
    and no evicted block is ever mistaken for a cached one."""
    eng = BatonEngine.load(tiny_model_dir, max_num_seqs=8, num_kv_blocks=12)
    base = list(range(3, 51))  # 3 full blocks
    prompts = [base + [100 + i] * 5 for i in range(4)] + [[(300 + 37 * i + j) % 512 for j in range(40)] for i in range(6)]
    async with eng:
        await collect(eng, req("warm", base + [9], max_tokens=2, **GREEDY))
        results = await asyncio.gather(*[collect(eng, req(f"r{i}", p, max_tokens=8, **GREEDY))
                                         for i, p in enumerate(prompts)])
        assert eng.stats().prefix_cache_hits_total >= 4 * 48
        assert eng.core.cache.allocator.evictions > 0
        again = await collect(eng, req("again", prompts[0], max_tokens=8, **GREEDY))
        assert_all_free(eng)
    assert [r[0] for r in results] == [hf_greedy(hf_model, p, 8) for p in prompts]
    assert again[0] == results[0][0]


async def test_prefix_hit_on_the_prefill_worker_hands_off_correct_kv(tiny_model_dir, hf_model):
    """A prefill worker that reuses cached blocks leases them to the decode worker like any other block."""
    registry = InProcessRegistry()
    pre = BatonEngine.load(tiny_model_dir, role="prefill", kv_transport=InProcessKVTransport(registry))
    dec = BatonEngine.load(tiny_model_dir, role="decode", kv_transport=InProcessKVTransport(registry))
    p = list(range(3, 60))
    async with pre, dec:
        outs = []
        for rid in ("x", "y"):
            _, _, hop = await collect(pre, req(rid, p, max_tokens=1, **GREEDY))
            kv = hop[-1].kv_transfer_params
            from baton.worker.engine.types import GenerationRequest, SamplingParams
            toks, _, _ = await collect(dec, GenerationRequest(rid, p, SamplingParams(max_tokens=10, **GREEDY),
                                                              kv_transfer_params=kv))
            outs.append(toks)
        assert pre.stats().prefix_cache_hits_total == 48
        await asyncio.sleep(0.05)
        assert_all_free(pre)
        assert_all_free(dec)
    assert outs[0] == outs[1] == hf_greedy(hf_model, p, 10)


def test_whole_prompt_admission_counts_an_imported_prompt_once(tiny_model_dir):
    """Without chunking, an imported prompt computing its last position is already active: it must not count
    twice against max_num_seqs, or a waiting prompt that fits is held back a step."""
    eng = BatonEngine.load(tiny_model_dir, role="decode", max_num_seqs=2, enable_chunked_prefill=False,
                           enable_prefix_caching=False)
    sched = eng.core.scheduler
    imported = _sequence(eng, "imp", list(range(3, 40)), 4)
    imported.block_ids = eng.core.cache.allocator.allocate(3)
    imported.num_computed = 36
    sched.import_done(imported, last_position=True)
    sched.add(_sequence(eng, "new", [1, 2, 3], 4))
    step = sched.schedule()
    assert [c.seq.request_id for c in step.prefill] == ["imp", "new"]
