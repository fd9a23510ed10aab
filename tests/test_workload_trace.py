"""Trace replay in the one workload model: a trace's (input, output) pairs are drawn as they are, so its median
and p90 survive; a lognormal fitted to the same trace's moments does not keep a bimodal shape."""
from __future__ import annotations

import random

import pytest

from baton.workload import SHAREGPT_LIKE, LengthDist, Request, Workload, percentile


def bimodal_trace(n: int = 1000) -> list[Request]:
    """60 % short prompts (40..79 tokens) with long answers, 40 % long prompts (1400..1799) with short ones, 4
    requests a second: a median in the short mode and a p90 in the long one, which no lognormal has at once."""
    out = []
    for i in range(n):
        if i % 5 < 3:
            p, o = 40 + (i * 7) % 40, 300 + (i * 11) % 100
        else:
            p, o = 1400 + (i * 13) % 400, 10 + (i * 3) % 20
        out.append(Request(i * 0.25, p, o))
    return out


def quantiles(xs: list[int]) -> tuple[float, float]:
    return percentile(xs, 50), percentile(xs, 90)


def test_a_replayed_trace_keeps_its_median_and_p90():
    trace = bimodal_trace()
    med, p90 = quantiles([r.prompt_tokens for r in trace])
    out_med, out_p90 = quantiles([r.output_tokens for r in trace])
    w = Workload.from_trace(trace)
    reqs = w.requests(1500, seed=3)  # one and a half passes: not a multiple of the trace
    got_med, got_p90 = quantiles([r.prompt_tokens for r in reqs])
    assert got_med == pytest.approx(med, rel=0.05) and got_p90 == pytest.approx(p90, rel=0.05)
    got = quantiles([r.output_tokens for r in reqs])
    assert got[0] == pytest.approx(out_med, rel=0.05) and got[1] == pytest.approx(out_p90, rel=0.05)
    # the tolerance means something: a lognormal with the trace's mean and sd misses the median several times
    # over (the fit `baton plan --trace` used to make)
    ins = [r.prompt_tokens for r in trace]
    mean = sum(ins) / len(ins)
    sd = (sum((x - mean) ** 2 for x in ins) / len(ins)) ** 0.5
    fit = LengthDist.lognormal(mean, sd, min(ins), max(ins))
    rng = random.Random(3)
    fit_med, fit_p90 = quantiles([fit.sample(rng) for _ in range(1500)])
    assert fit_med > 3 * med and abs(fit_p90 - p90) > 0.1 * p90


def test_replay_draws_whole_pairs():
    trace = bimodal_trace(200)
    w = Workload.from_trace(trace)
    pairs = {(r.prompt_tokens, r.output_tokens) for r in trace}
    reqs = w.requests(700, seed=1)
    # a long prompt keeps its short answer: every drawn pair is one the trace had
    assert {(r.prompt_tokens, r.output_tokens) for r in reqs} <= pairs
    # each pass replays every request once: 700 = 3 full passes + 100
    counts: dict[tuple[int, int], int] = {}
    for r in reqs:
        counts[(r.prompt_tokens, r.output_tokens)] = counts.get((r.prompt_tokens, r.output_tokens), 0) + 1
    assert min(counts.values()) >= 3 and max(counts.values()) <= 4 and len(counts) == len(pairs)
    # deterministic, and the same lengths at every rate (only arrival times scale)
    again = w.requests(700, seed=1, rate=50.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in again] == [(r.prompt_tokens, r.output_tokens) for r in reqs]


def test_from_trace_rate_marginals_and_words():
    trace = bimodal_trace(200)
    w = Workload.from_trace(trace)
    assert w.rate == pytest.approx(4.0)
    assert w.prompt.kind == "empirical" and w.prompt.upper == max(r.prompt_tokens for r in trace)
    assert w.prompt.mean == pytest.approx(sum(r.prompt_tokens for r in trace) / 200)
    assert w.lengths_model() == "trace replay of 200 requests"
    med = percentile([r.prompt_tokens for r in trace], 50)
    assert f"median {med:g}" in str(w.prompt) and "trace replay of 200 requests" in w.describe()
    # moments only: a lognormal, and said so
    assert SHAREGPT_LIKE.lengths_model() == "fitted lognormal"
    mixed = Workload(1.0, LengthDist.fixed(8), SHAREGPT_LIKE.output)
    assert mixed.lengths_model() == "input fixed, output fitted lognormal"
    # one request: no span, no rate
    assert Workload.from_trace(trace[:1]).rate == 0.0


def test_from_trace_needs_input_lengths():
    trace = [Request(0.0, 100, 5), Request(1.0, 0, 5, prompt="hi")]
    with pytest.raises(ValueError, match="t.jsonl: 1 of 2 requests have no input_len"):
        Workload.from_trace(trace, where="t.jsonl")
    with pytest.raises(ValueError, match="no requests"):
        Workload.from_trace([])
    with pytest.raises(ValueError):
        LengthDist.empirical([])


def test_empirical_lengths_draw_observed_values():
    d = LengthDist.empirical([5, 1, 9, 9])
    assert (d.minimum, d.maximum, d.values) == (1, 9, (1, 5, 9, 9))
    rng = random.Random(0)
    assert {d.sample(rng) for _ in range(200)} == {1, 5, 9}
