"""Sampling API parity in the engine: penalties, min_tokens and logprobs against references computed by hand
from the Hugging Face model's logits for the same context (real tiny model, real engine)."""
from __future__ import annotations

import pytest
import torch
from baton.worker.engine.sampling import apply_penalties
from baton.worker.engine.types import InvalidRequest, SamplingParams

from .test_engine import collect, req

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def hf_next_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def reference_greedy(hf, prompt: list[int], n: int, penalize) -> list[int]:
    """Greedy continuation where `penalize(logits, prompt, out)` edits the HF logits before each argmax."""
    out: list[int] = []
    for _ in range(n):
        logits = hf_next_logits(hf, prompt + out)
        penalize(logits, prompt, out)
        out.append(int(logits.argmax()))
    return out


def by_hand_repetition(r: float):
    def apply(logits, prompt, out):
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    return apply


def by_hand_frequency_presence(f: float, p: float):
    def apply(logits, prompt, out):
        for t in set(out):
            logits[t] -= f * out.count(t) + p
    return apply


async def test_repetition_penalty_matches_hand_reference(engine, hf_model):
    prompt = engine.tokenizer.encode(PROMPT)
    plain = reference_greedy(hf_model, prompt, 10, lambda *a: None)
    want = reference_greedy(hf_model, prompt, 10, by_hand_repetition(1.8))
    assert want != plain  # the penalty changes the greedy answer on this model, so the check means something
    got, _, _ = await collect(engine, req("rp", prompt, max_tokens=10, temperature=0, ignore_eos=True,
                                          repetition_penalty=1.8))
    assert got == want
    unpenalized, _, _ = await collect(engine, req("plain", prompt, max_tokens=10, temperature=0, ignore_eos=True))
    assert unpenalized == plain  # greedy without the options is unchanged


async def test_frequency_and_presence_penalties_match_hand_reference(engine, hf_model):
    prompt = engine.tokenizer.encode(PROMPT)
    plain = reference_greedy(hf_model, prompt, 10, lambda *a: None)
    for f, p in ((1.5, 0.0), (0.0, 1.5), (0.7, 0.4)):
        want = reference_greedy(hf_model, prompt, 10, by_hand_frequency_presence(f, p))
        assert want != plain, (f, p)
        got, _, _ = await collect(engine, req(f"fp{f}{p}", prompt, max_tokens=10, temperature=0, ignore_eos=True,
                                              frequency_penalty=f, presence_penalty=p))
        assert got == want, (f, p)


def test_penalties_follow_vllm_formulas():
    """apply_penalties on a known row: repetition over prompt+output, frequency/presence over output only."""
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0, 0.5, 3.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, min_tokens=3)
    x = apply_penalties(logits, [p], [[0, 1]], [[3, 3]], [frozenset({5})])
    #        prompt: 2/2, -2*2       untouched   output x2: 4/2 - 0.5*2 - 0.25   untouched  banned (min_tokens)
    assert x[0].tolist() == [1.0, -4.0, 1.0, 0.75, 0.5, float("-inf")]
    assert logits[0, 0] == 2.0  # the caller's logits (raw, for logprobs) are left alone
    done = apply_penalties(logits, [SamplingParams(min_tokens=2)], [[0]], [[3, 3]], [frozenset({5})])
    assert done[0, 5] == 3.0  # min_tokens reached: the stop token is allowed again


async def test_logprobs_are_raw_log_softmax_of_the_model(engine, hf_model):
    prompt = engine.tokenizer.encode(PROMPT)
    cases = {
        "greedy": {"temperature": 0},
        # sampled with temperature and a penalty: logprobs stay the model's raw ones (vLLM's raw_logprobs)
        "sampled": {"temperature": 0.7, "seed": 11, "presence_penalty": 1.0, "top_k": 50},
    }
    for name, extra in cases.items():
        tokens, _, outs = await collect(engine, req(name, prompt, max_tokens=6, ignore_eos=True, logprobs=5, **extra))
        lps = [lp for o in outs for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == tokens
        if name == "greedy":
            lps_greedy = lps
        for t, lp in enumerate(lps):
            ref = hf_next_logits(hf_model, prompt + tokens[:t]).log_softmax(-1)
            assert lp.logprob == pytest.approx(ref[tokens[t]].item(), abs=1e-4), (name, t)
            top_v, top_i = ref.topk(5)
            assert [i for i, _ in lp.top] == top_i.tolist(), (name, t)
            assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
            assert lp.rank == int((ref > ref[tokens[t]]).sum()) + 1
            if name == "greedy":
                assert lp.rank == 1
    # logprobs=0: the sampled token's logprob only
    _, _, outs = await collect(engine, req("zero", prompt, max_tokens=2, temperature=0, logprobs=0))
    assert all(o.logprobs and o.logprobs[0].top == () for o in outs)
    # not asked: none, and the same tokens as with logprobs (greedy unchanged)
    plain, _, outs = await collect(engine, req("none", prompt, max_tokens=6, temperature=0, ignore_eos=True))
    assert all(o.logprobs is None for o in outs)
    assert plain == [lp.token_id for lp in lps_greedy]


async def test_min_tokens_holds_back_eos_and_stop_tokens(engine, hf_model):
    """EOS-heavy: make the token greedy decoding picks first the model's EOS; without min_tokens the answer is
    over after one token, with min_tokens=5 the first 5 tokens avoid it (a hand reference masks it too)."""
    prompt = engine.tokenizer.encode(PROMPT)
    first = reference_greedy(hf_model, prompt, 1, lambda *a: None)[0]
    engine.eos_token_ids = (first,)  # every new Sequence takes its EOS ids from here
    tokens, _, outs = await collect(engine, req("eos", prompt, max_tokens=12, temperature=0))
    assert tokens == [first] and outs[-1].finish_reason == "stop"

    def mask_first(n):
        def apply(logits, prompt, out):
            if len(out) < n:
                logits[first] = float("-inf")
        return apply

    want = reference_greedy(hf_model, prompt, 12, mask_first(5))
    if first in want:
        want = want[:want.index(first) + 1]  # after min_tokens, EOS stops as usual
    tokens, _, outs = await collect(engine, req("min", prompt, max_tokens=12, temperature=0, min_tokens=5))
    assert tokens == want and len(tokens) >= 5 and first not in tokens[:5]
    # the same through stop_token_ids (ignore_eos leaves only the stop token), sampled with a seed
    engine.eos_token_ids = ()
    for seed in range(4):
        tokens, _, outs = await collect(engine, req(f"stop{seed}", prompt, max_tokens=12, temperature=0.5, seed=seed,
                                                    stop_token_ids=(first,), min_tokens=4))
        assert len(tokens) >= 4 and first not in tokens[:4], tokens
        assert outs[-1].finish_reason == ("stop" if tokens[-1] == first else "length")


async def test_min_tokens_defers_stop_strings(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    tokens, _, _ = await collect(engine, req("s0", prompt, max_tokens=8, temperature=0, ignore_eos=True))
    stop = engine.tokenizer.decode(tokens[:1])
    assert stop.strip(), "the first token must have text for this test"
    _, cut, outs = await collect(engine, req("s1", prompt, max_tokens=8, temperature=0, ignore_eos=True,
                                             stop=(stop,)))
    assert cut == "" and outs[-1].finish_reason == "stop"
    n, held, outs = await collect(engine, req("s2", prompt, max_tokens=8, temperature=0, ignore_eos=True,
                                              stop=(stop,), min_tokens=3))
    assert len(n) >= 3 and held.startswith(engine.tokenizer.decode(tokens[:1]))


async def test_seeded_sampling_with_penalties_is_reproducible(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    sp = {"max_tokens": 10, "temperature": 0.9, "seed": 7, "ignore_eos": True, "frequency_penalty": 0.8,
          "repetition_penalty": 1.2, "logprobs": 2}
    a, _, _ = await collect(engine, req("a", prompt, **sp))
    # again, now sharing the batch with other requests
    import asyncio
    b, *_ = await asyncio.gather(collect(engine, req("b", prompt, **sp)),
                                 collect(engine, req("c", prompt, max_tokens=10, temperature=1.0, ignore_eos=True)),
                                 collect(engine, req("d", prompt[:3], max_tokens=5, temperature=0)))
    assert a == b[0]


@pytest.mark.parametrize(("field", "value"), [("presence_penalty", 3.0), ("frequency_penalty", float("nan")),
                                               ("repetition_penalty", 0.0), ("min_tokens", 99), ("logprobs", 21)])
async def test_engine_refuses_bad_values_naming_the_field(engine, field, value):
    with pytest.raises(InvalidRequest) as info:
        await collect(engine, req("bad", [5, 6, 7], max_tokens=4, **{field: value}))
    assert info.value.param == field
