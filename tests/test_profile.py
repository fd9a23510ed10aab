"""Latency profiles (baton/profile.py): the built-in DistServe fits, the file format, and the fit."""
from __future__ import annotations

import json
import random

import pytest

from baton.profile import ProfileSet, WorkerProfile, fit_decode, fit_prefill


def test_builtin_distserve_profile():
    opt13 = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b")
    assert opt13.tensor_parallel_degrees == [1, 2, 4]
    tp2 = opt13.get(2)
    # DistServe's OPT-13B TP=2 fit and its max_num_tokens table (pp=1)
    assert tp2.prefill == pytest.approx((14.742973695171262, 0.06857720739764, 2.4495727400243586e-06))
    assert tp2.kv_capacity_tokens == 163008 and tp2.large_bs_threshold == 95
    assert tp2.decode_step_s(10, 5000) == pytest.approx((13.294796350285385 + 0.00034109219700723494 * 5000
                                                         + 0.06296393225243659 * 10) / 1000)
    assert tp2.decode_coeffs(95) == tp2.decode_large
    assert WorkerProfile.builtin(1) == opt13.get(1)
    with pytest.raises(ValueError, match="tensor-parallel \\[1, 2, 4\\], not 3"):
        opt13.get(3)
    with pytest.raises(ValueError, match="no model 'x'"):
        ProfileSet.load("a100-80g-distserve").for_model("x")


def test_file_round_trip_and_errors(tmp_path):
    ps = ProfileSet.load("a100-80g-distserve")
    p = tmp_path / "p.json"
    ps.save(p)
    again = ProfileSet.load(p)
    assert again.models == ps.models and again.hardware == ps.hardware
    p.write_text(json.dumps({"prefill": [1, 2, 3]}))
    with pytest.raises(ValueError, match="not a Baton profile"):
        ProfileSet.load(p)
    p.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        ProfileSet.load(p)
    with pytest.raises(ValueError, match="no such profile file"):
        ProfileSet.load(tmp_path / "missing.json")
    p.write_text(json.dumps({"format": "baton.profile/v1", "models": {"m": {"1": {"prefill": [1, 2, 3]}}}}))
    with pytest.raises(ValueError, match="model m: bad worker profile"):
        ProfileSet.load(p)


def test_chunked_prefill_follows_the_engine_unless_the_file_says():
    """How the planner schedules the colocated rival: the Baton engine's `both` worker chunks its prompts; the
    shipped profiles are DistServe's engine and vLLM as DistServe measured it (whole-prompt steps)."""
    assert not ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b").chunked_prefill
    assert not ProfileSet.load("a100-80g-vllm").for_model("facebook/opt-13b").chunked_prefill
    doc = ProfileSet.load("a100-80g-vllm").to_dict()
    assert ProfileSet.from_dict({**doc, "engine": "baton"}).for_model("facebook/opt-13b").chunked_prefill
    assert ProfileSet.from_dict({**doc, "chunked_prefill": True}).for_model("facebook/opt-13b").chunked_prefill
    assert not ProfileSet.from_dict({**doc, "engine": "baton", "chunked_prefill": False}).for_model(
        "facebook/opt-13b").chunked_prefill
    assert ProfileSet.from_dict({**doc, "chunked_prefill": True}).to_dict()["chunked_prefill"] is True
    with pytest.raises(ValueError, match="chunked_prefill: expected true or false, got 'yes'"):
        ProfileSet.from_dict({**doc, "chunked_prefill": "yes"}).for_model("facebook/opt-13b")


def test_fits_recover_known_coefficients_from_noisy_samples():
    rng = random.Random(0)
    a, b, c = 12.0, 0.05, 3e-6
    batches = [[rng.randint(16, 2048) for _ in range(rng.randint(1, 4))] for _ in range(60)]
    samples = [(lens, (a + b * sum(lens) + c * sum(n * n for n in lens)) * rng.uniform(0.98, 1.02))
               for lens in batches]
    fa, fb, fc = fit_prefill(samples)
    assert fa == pytest.approx(a, rel=0.2) and fb == pytest.approx(b, rel=0.05) and fc == pytest.approx(c, rel=0.3)
    dec = [(bs, ctx, 8.0 + 0.001 * ctx + 0.2 * bs) for bs in (1, 2, 4, 8, 16) for ctx in (bs * 64, bs * 512)]
    assert fit_decode(dec) == pytest.approx((8.0, 0.001, 0.2), rel=1e-6)
    # a column that never varies from zero gets a zero coefficient instead of a singular system
    assert fit_decode([(0, 100, 5.0), (0, 200, 6.0)]) == pytest.approx((4.0, 0.01, 0.0))
    with pytest.raises(ValueError, match="do not determine"):
        fit_decode([(1, 100, 5.0), (1, 100, 6.0)])


def test_fits_never_go_negative():
    # decode steps that get cheaper with batch size at fixed context (noise on a tiny model): the batch term
    # is dropped instead of fitted negative, so no batch size predicts a negative step
    dec = [(bs, ctx, 1.0 + 0.001 * ctx - 0.01 * bs) for bs in (1, 8, 32) for ctx in (bs * 64, bs * 512)]
    a, b, c = fit_decode(dec)
    assert min(a, b, c) >= 0 and c == 0.0
    prof = WorkerProfile((0, 0, 0), (a, b, c), (a, b, c), 1 << 30, 10**6)
    assert prof.decode_step_s(1000, 1000) > 0
