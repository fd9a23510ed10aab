"""The engine: continuous batching vs HF generate, sampling, stops, limits, KV accounting."""
from __future__ import annotations

import asyncio

import pytest
import torch
from baton.worker.engine.engine import BatonEngine
from baton.worker.engine.types import (
    EngineOverloaded,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)

from .conftest import hf_greedy

GREEDY = {"temperature": 0.0, "ignore_eos": True}
TEXTS = ["Hello there", "The quick brown fox jumps over the lazy dog and then", "A",
         "Kubernetes runs containers in pods. A deployment keeps", "One, two, three",
         "Please write a short poem about the ocean"]


async def collect(engine, request):
    tokens, text, outs = [], "", []
    async for out in engine.generate(request):
        tokens += out.token_ids
        text += out.text
        outs.append(out)
    return tokens, text, outs


def req(rid, ids, **sampling):
    return GenerationRequest(rid, ids, SamplingParams(**sampling))


def assert_all_free(eng):
    s = eng.stats()
    assert s.num_blocks_free == s.num_blocks_total, s
    assert s.num_running == 0 and s.num_waiting == 0


async def test_batch_matches_hf_generate_with_joins_and_leaves(engine, hf_model):
    tok = engine.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    lengths = [12, 5, 20, 9, 16, 7]  # requests leave at different steps
    expected = [hf_greedy(hf_model, p, n) for p, n in zip(prompts, lengths)]

    async def late(i, delay_tokens_from):
        # join after another request has produced some tokens
        await delay_tokens_from.wait()
        return await collect(engine, req(f"r{i}", prompts[i], max_tokens=lengths[i], **GREEDY))

    started = asyncio.Event()

    async def first(i):
        tokens = []
        async for out in engine.generate(req(f"r{i}", prompts[i], max_tokens=lengths[i], **GREEDY)):
            tokens += out.token_ids
            if len(tokens) == 3:
                started.set()
        return tokens, None, None

    results = await asyncio.gather(first(0), collect(engine, req("r1", prompts[1], max_tokens=lengths[1], **GREEDY)),
                                   collect(engine, req("r2", prompts[2], max_tokens=lengths[2], **GREEDY)),
                                   late(3, started), late(4, started), late(5, started))
    assert [r[0] for r in results] == expected
    s = engine.stats()
    assert s.generation_tokens_total == sum(lengths)
    assert s.prompt_tokens_total == sum(len(p) for p in prompts)
    assert_all_free(engine)


async def test_outputs_and_text(engine):
    ids = engine.tokenizer.encode("Hello there")
    tokens, text, outs = await collect(engine, req("a", ids, max_tokens=6, **GREEDY))
    assert len(outs) == 6 and all(len(o.token_ids) == 1 for o in outs)
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert outs[-1].num_generated_tokens == 6 and outs[-1].num_prompt_tokens == len(ids)
    assert text == engine.tokenizer.decode(tokens)


async def test_seeded_sampling_is_reproducible(engine):
    ids = engine.tokenizer.encode("Once upon a time")
    params = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234, "ignore_eos": True}
    a, _, _ = await collect(engine, req("s1", ids, **params))
    # same seed, different company in the batch
    other = req("noise", engine.tokenizer.encode("Other text entirely"), max_tokens=20, temperature=1.0)
    (b, _, _), _ = await asyncio.gather(collect(engine, req("s2", ids, **params)), collect(engine, other))
    c, _, _ = await collect(engine, req("s3", ids, **{**params, "seed": 99}))
    assert a == b
    assert a != c
    # temperature sampling actually samples (not greedy)
    g, _, _ = await collect(engine, req("g", ids, max_tokens=12, **GREEDY))
    assert a != g


async def test_top_k_one_is_greedy(engine):
    ids = engine.tokenizer.encode("Once upon a time")
    g, _, _ = await collect(engine, req("g", ids, max_tokens=8, **GREEDY))
    k1, _, _ = await collect(engine, req("k", ids, max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True))
    tiny_p, _, _ = await collect(engine, req("p", ids, max_tokens=8, temperature=1.0, top_p=1e-6, seed=1,
                                               ignore_eos=True))
    assert g == k1 == tiny_p


async def test_stop_strings_and_stop_tokens(engine):
    ids = engine.tokenizer.encode("The quick brown fox")
    tokens, text, _ = await collect(engine, req("full", ids, max_tokens=16, **GREEDY))
    assert len(text) > 6
    stop = text[4:7]
    cut = text.find(stop)
    t2, text2, outs2 = await collect(engine, req("stop", ids, max_tokens=16, stop=(stop,), **GREEDY))
    assert text2 == text[:cut]
    assert outs2[-1].finish_reason == "stop"
    assert t2 == tokens[:len(t2)]
    # stop token ids: stop at the 5th generated token, which is included in token_ids
    t3, _, outs3 = await collect(engine, req("tok", ids, max_tokens=16, stop_token_ids=(tokens[4],), **GREEDY))
    assert t3 == tokens[:tokens.index(tokens[4]) + 1]
    assert outs3[-1].finish_reason == "stop"


async def test_eos_stops_unless_ignored(tiny_model_dir):
    ids = [0, 5, 9]
    probe = BatonEngine.load(tiny_model_dir)
    async with probe:
        tokens, _, _ = await collect(probe, req("p", ids, max_tokens=4, **GREEDY))
    # pretend the 3rd greedy token is the model's eos
    eng = BatonEngine.load(tiny_model_dir)
    eng.eos_token_ids = (tokens[2],)
    async with eng:
        t, _, outs = await collect(eng, req("e", ids, max_tokens=4, temperature=0.0))
        assert t == tokens[:tokens.index(tokens[2]) + 1] and outs[-1].finish_reason == "stop"
        assert outs[-1].text == "" or tokens[2] not in t[:-1]
        t, _, outs = await collect(eng, req("i", ids, max_tokens=4, temperature=0.0, ignore_eos=True))
        assert t == tokens and outs[-1].finish_reason == "length"


async def test_invalid_requests(engine):
    with pytest.raises(InvalidRequest) as e:
        await collect(engine, req("x", [1] * 1000, max_tokens=100))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as e:
        await collect(engine, req("x", [1] * 1024, max_tokens=1))
    assert e.value.param == "prompt"
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("top_k", -5)]:
        with pytest.raises(InvalidRequest) as e:
            await collect(engine, req("x", [1, 2], **{field: value}))
        assert e.value.param == field
    with pytest.raises(InvalidRequest) as e:
        await collect(engine, req("x", [], max_tokens=1))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest):
        await collect(engine, req("x", [10 ** 6], max_tokens=1))
    assert_all_free(engine)


async def test_overloaded_when_queue_full(tiny_model_dir):
    eng = BatonEngine.load(tiny_model_dir, max_waiting=2, max_num_seqs=1)
    async with eng:
        gens = [eng.generate(req(f"q{i}", [0, 5, 6], max_tokens=30, **GREEDY)) for i in range(2)]
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0)  # both are queued now
        with pytest.raises(EngineOverloaded):
            await collect(eng, req("q-over", [0, 5, 6], max_tokens=2))
        await asyncio.gather(*firsts)
        for g in gens:
            await g.aclose()
        await asyncio.sleep(0.05)
        assert_all_free(eng)


async def test_kv_cache_full_queues_then_all_blocks_freed(tiny_model_dir, hf_model):
    # 8 blocks of 16 tokens: each request needs 3 blocks (prompt ~20 + 20 new), so at most 2 run at once
    eng = BatonEngine.load(tiny_model_dir, num_kv_blocks=8, max_num_seqs=8)
    prompts = [eng.tokenizer.encode(t) for t in TEXTS[:5]]
    expected = [hf_greedy(hf_model, p, 20) for p in prompts]
    seen_waiting = 0

    async def watch():
        nonlocal seen_waiting
        while True:
            seen_waiting = max(seen_waiting, eng.stats().num_waiting)
            assert eng.stats().num_blocks_free >= 0
            await asyncio.sleep(0.001)

    async with eng:
        w = asyncio.create_task(watch())
        results = await asyncio.gather(*[collect(eng, req(f"k{i}", p, max_tokens=20, **GREEDY))
                                         for i, p in enumerate(prompts)])
        w.cancel()
        assert [r[0] for r in results] == expected
        assert seen_waiting > 0
        assert_all_free(eng)


async def test_busy_seconds_count_forward_steps_only(engine):
    """`baton_engine_busy_seconds_total`: the autoscaler's busy share and prefill capacity (prompt tokens per
    busy second). Idle time does not count; a request's forward steps do."""
    assert engine.stats().busy_seconds_total == 0.0
    await asyncio.sleep(0.2)  # the engine loop runs, with nothing to compute
    assert engine.stats().busy_seconds_total == 0.0
    t0 = asyncio.get_running_loop().time()
    await collect(engine, req("b0", engine.tokenizer.encode(TEXTS[0]), max_tokens=8, **GREEDY))
    wall = asyncio.get_running_loop().time() - t0
    busy = engine.stats().busy_seconds_total
    assert 0.0 < busy <= wall


async def test_preemption_by_recompute_keeps_outputs(tiny_model_dir, hf_model):
    # admitted with 1-2 blocks each, then decode growth runs out of blocks -> newest is preempted
    eng = BatonEngine.load(tiny_model_dir, num_kv_blocks=6, max_num_seqs=4)
    prompts = [eng.tokenizer.encode(t)[:14] for t in TEXTS[:4]]
    expected = [hf_greedy(hf_model, p, 30) for p in prompts]
    async with eng:
        results = await asyncio.gather(*[collect(eng, req(f"p{i}", p, max_tokens=30, **GREEDY))
                                         for i, p in enumerate(prompts)])
        assert [r[0] for r in results] == expected
        assert eng.stats().num_preemptions_total > 0
        assert_all_free(eng)


async def test_abort_frees_blocks(engine):
    ids = engine.tokenizer.encode("The quick brown fox")
    gen = engine.generate(req("ab1", ids, max_tokens=200, **GREEDY))
    await gen.__anext__()
    assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
    await gen.aclose()  # client went away
    await asyncio.sleep(0.05)
    assert_all_free(engine)
    # explicit abort ends the stream with finish_reason "abort"
    outs = []

    async def run():
        async for o in engine.generate(req("ab2", ids, max_tokens=200, **GREEDY)):
            outs.append(o)

    task = asyncio.create_task(run())
    while not outs:
        await asyncio.sleep(0.001)
    await engine.abort("ab2")
    await asyncio.wait_for(task, 5)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert_all_free(engine)


async def test_event_loop_stays_responsive(engine):
    ids = engine.tokenizer.encode("Hello")
    task = asyncio.create_task(collect(engine, req("resp", ids, max_tokens=200, **GREEDY)))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.001)
        ticks += 1
    assert ticks > 5
    assert len((await task)[0]) == 200


def test_threads_setting():
    assert torch.get_num_threads() == 1
