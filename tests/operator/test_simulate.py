"""The autoscaling simulator's accounting on hand-computable traces, determinism, speed, and the CLI."""
import argparse
import json
import math
import time
from dataclasses import replace

import pytest
from baton.operator.autoscale_policy import PolicyConfig, RoleBounds
from baton.operator.simulate import BatonController, SimConfig, fixed_controller, simulate
from baton.operator.simulate_baselines import (
    DynamoPlannerController,
    _Sample,
    decode_max_batch,
    decode_throughput_per_replica,
)
from baton.operator.simulate_cli import add_simulate_command

from baton.profile import WorkerProfile
from baton.workload import LengthDist, Request, on_off_steps, poisson_requests

PROMPT = LengthDist.lognormal(613, 403, 16, 2048)
OUTPUT = LengthDist.lognormal(176, 167, 2, 1024)


def flat(prefill_ms=100.0, step_ms=10.0, per_ctx_ms=0.0, tp=1, kv=100_000) -> WorkerProfile:
    return WorkerProfile(prefill=(prefill_ms, 0.0, 0.0), decode_small=(step_ms, per_ctx_ms, 0.0),
                         decode_large=(step_ms, per_ctx_ms, 0.0), large_bs_threshold=1000,
                         kv_capacity_tokens=kv, tensor_parallel=tp)


def test_one_request_ttft_tpot_and_gpu_hours():
    cfg = SimConfig(flat(), flat(tp=2), ttft_slo_s=0.1, tpot_slo_s=0.01, interval_s=15.0)
    res = simulate(cfg, [Request(0.0, 10, 11)], fixed_controller(1, 1))
    (r,) = res.requests
    assert r.ttft_s == pytest.approx(0.1)           # one 100 ms prefill batch
    assert r.tpot_s == pytest.approx(0.01)          # 10 decode steps of 10 ms
    assert res.attainment == 1.0
    # ends at the first evaluation (15 s) after everything finished: 1 prefill GPU + 2 decode GPUs for 15 s
    assert res.end_s == 15.0
    assert res.gpu_hours == pytest.approx(3 * 15.0 / 3600)


def test_queueing_batching_and_context_growth():
    # second request arrives during the first batch: waits for it (TTFT 0.15 s)
    cfg = SimConfig(flat(), flat(), ttft_slo_s=0.12, tpot_slo_s=0.01)
    res = simulate(cfg, [Request(0.0, 10, 11), Request(0.05, 10, 11)], fixed_controller(1, 1))
    assert [r.ttft_s for r in res.requests] == pytest.approx([0.1, 0.15])
    assert res.attainment == 0.5
    # requests queued during a batch share the next one
    res = simulate(cfg, [Request(0.0, 10, 2), Request(0.01, 10, 2), Request(0.02, 10, 2)], fixed_controller(1, 1))
    assert [r.ttft_s for r in res.requests] == pytest.approx([0.1, 0.19, 0.18])
    # decode step time grows with context: prompt 9 -> context 10 then 11, 1 ms per token on top of 10 ms
    cfg = SimConfig(flat(), flat(per_ctx_ms=1.0), ttft_slo_s=1, tpot_slo_s=1)
    (r,) = simulate(cfg, [Request(0.0, 9, 3)], fixed_controller(1, 1)).requests
    assert r.tpot_s == pytest.approx((0.020 + 0.021) / 2)


def test_joins_happen_at_step_boundaries():
    # A decodes alone (10 ms steps); B's first token lands at 0.2 s, while A is mid-way through its steps
    cfg = SimConfig(flat(), flat(), ttft_slo_s=1, tpot_slo_s=1)
    res = simulate(cfg, [Request(0.0, 10, 31), Request(0.1, 10, 5)], fixed_controller(1, 1))
    a, b = res.requests
    assert a.tpot_s == pytest.approx(0.01) and b.tpot_s == pytest.approx(0.01)
    assert b.ttft_s == pytest.approx(0.1)


def test_kv_capacity_makes_requests_wait():
    # capacity for one request at a time: the second waits for the first to finish (its TPOT includes it)
    cfg = SimConfig(flat(), flat(kv=35), ttft_slo_s=1, tpot_slo_s=0.015)
    res = simulate(cfg, [Request(0.0, 10, 21), Request(0.0, 10, 11)], fixed_controller(1, 1))
    a, b = res.requests
    assert a.tpot_s == pytest.approx(0.01)          # decodes 0.1 .. 0.3 s
    assert b.tpot_s == pytest.approx(0.02)          # first token 0.2 s, waits to 0.3 s, 10 steps to 0.4 s
    assert res.tpot_attainment == 0.5


def test_scaling_accounts_gpus_from_creation_and_startup_delay():
    calls = []

    def ctl(obs):
        calls.append((obs.now_s, obs.prefill.current_replicas, obs.prefill.ready_replicas))
        return {"prefill": (2, "Test"), "decode": (1, "Test")}

    cfg = SimConfig(flat(), flat(), startup_s=5.0, interval_s=15.0)
    res = simulate(cfg, [Request(0.0, 10, 2), Request(31.0, 10, 2)], ctl)
    assert calls == [(15.0, 1, 1), (30.0, 2, 2)]     # ends at 45 s, the first evaluation after all finished
    # prefill: 0..45 and 15..45; decode 0..45
    assert res.end_s == 45.0
    assert res.gpu_hours == pytest.approx((45 + 30 + 45) / 3600)
    assert [p.prefill_replicas for p in res.timeline] == [2, 2]


def test_scale_down_releases_after_drain():
    def ctl(obs):
        return {"prefill": (1, "T"), "decode": (0, "T")}

    cfg = SimConfig(flat(), flat(), interval_s=1.0, initial_decode=1)
    # decode runs 0.1 s .. 10.1 s (1000 steps); scaled to 0 at t=1 it drains, released at 10.1 s
    res = simulate(cfg, [Request(0.0, 10, 1001)], ctl)
    assert res.requests[0].tpot_s == pytest.approx(0.01)
    assert res.gpu_hours == pytest.approx((res.end_s + 10.1) / 3600)


def test_deterministic_and_fast_for_an_hour():
    prof = WorkerProfile.builtin(1)
    tr = poisson_requests(on_off_steps(2, 12, 120, 480, 3600), 3600, PROMPT, OUTPUT, 7)
    cfg = SimConfig(prof, prof, ttft_slo_s=0.4, tpot_slo_s=0.05)
    pc = PolicyConfig(ttft_slo_s=0.4, tpot_slo_s=0.05, prefill=RoleBounds(1, 16), decode=RoleBounds(1, 16))
    t0 = time.perf_counter()
    a = simulate(cfg, tr, BatonController(pc))
    assert time.perf_counter() - t0 < 20
    b = simulate(cfg, tr, BatonController(pc))
    assert a.summary() == b.summary() and a.timeline == b.timeline
    assert tr == poisson_requests(on_off_steps(2, 12, 120, 480, 3600), 3600, PROMPT, OUTPUT, 7)
    assert all(r.ttft_s is not None for r in a.requests)


def test_builtin_profile_matches_distserve_fit():
    prof = WorkerProfile.builtin(1)
    # a + b*512 + c*512^2 ms for one 512-token prompt (OPT-13B, A100, TP=1)
    assert prof.prefill_s([512]) == pytest.approx((18.10254647486372 + 0.1019122572698738 * 512
                                                   + 7.122264314252114e-06 * 512 * 512) / 1000)
    assert prof.kv_capacity_tokens == 66144
    with pytest.raises(ValueError):
        WorkerProfile.builtin(3)


def test_cli_runs_and_refuses_bad_input(tmp_path, capsys):
    from baton.cli import CommandError

    ap = argparse.ArgumentParser()
    add_simulate_command(ap.add_subparsers())
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 0.5, "input_len": 100, "output_len": 20})
                               for i in range(20)))
    args = ap.parse_args(["simulate", "--trace", str(trace), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["requests"] == 20
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": "baton.profile/v1", "models": {"m": {"1": {
        "prefill": [10, 0.01, 0], "decoding_smallbs": [5, 0, 0], "kv_capacity_tokens": 5000}}}}))
    args = ap.parse_args(["simulate", "--trace", str(trace), "--profile", str(cal), "--fixed", "1,1"])
    assert args.func(args) == 0
    capsys.readouterr()
    args = ap.parse_args(["simulate", "--trace", str(trace), "--dynamo", "--json", "--timeline"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["requests"] == 20 and out["summary"]["attainment"] > 0 and "timeline" in out
    for bad in (["simulate", "--bursts", "1,2"], ["simulate", "--trace", str(tmp_path / "missing.jsonl")],
                ["simulate", "--profile", str(trace)], ["simulate", "--fixed", "x"],
                ["simulate", "--input-len", "lognormal:0:1"], ["simulate", "--profile", str(cal), "--prefill-tp", "2"]):
        args = ap.parse_args(bad)
        with pytest.raises(CommandError):
            args.func(args)


def test_observes_ttft_stages_output_rate_and_prompt_length():
    seen = []

    def ctl(obs):
        seen.append(obs)
        return {"prefill": (1, "T"), "decode": (1, "T")}

    # the first decodes 20 steps (0.1 .. 0.3 s), the second joins it at 0.2 s: batch 2 for a while
    trace = [Request(0.0, 10, 21), Request(0.05, 30, 11), Request(1.5, 10, 2)]   # the last keeps it running
    simulate(SimConfig(flat(), flat(), interval_s=1.0, window_s=2.0), trace, ctl)
    p, d = seen[0].prefill, seen[0].decode
    # the second request waited 0.05 s for the first batch; each batch computes 0.1 s
    assert p.prefill_queue_p90_s == pytest.approx(0.045) and p.prefill_compute_p90_s == pytest.approx(0.1)
    assert p.kv_handoff_p90_s is None and p.first_decode_p90_s is None     # not modelled
    assert p.mean_prompt_tokens == pytest.approx(20.0)
    assert d.generation_tokens_per_s == pytest.approx((20 + 10) / 2.0)       # tokens, not steps, over 2 s
    seen.clear()
    simulate(SimConfig(flat(), flat(), interval_s=1.0, window_s=2.0, ttft_stages=False), trace, ctl)
    assert seen[0].prefill.prefill_queue_p90_s is None and seen[0].prefill.ttft_p90_s is not None


def test_floors_raise_min_replicas_over_time_as_an_applied_plan_does():
    pc = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.1, prefill=RoleBounds(1, 4), decode=RoleBounds(1, 4),
                      interval_s=15.0)
    floors = lambda t: {"prefill": 3 if t >= 30 else 0, "decode": 9 if t >= 60 else 0}
    ctl = BatonController(pc, floors=floors)
    trace = [Request(float(t), 10, 2) for t in range(0, 120, 5)]
    res = simulate(SimConfig(flat(), flat(), startup_s=5.0, interval_s=15.0), trace, ctl)
    p = {pt.time_s: pt.prefill_replicas for pt in res.timeline}
    d = {pt.time_s: pt.decode_replicas for pt in res.timeline}
    assert (p[15.0], p[30.0], p[90.0]) == (1, 3, 3)
    assert (d[45.0], d[60.0]) == (1, 4)                                        # never above maxReplicas
    assert ctl.config_at(0.0) == pc and ctl.config_at(60.0).decode == RoleBounds(4, 4)


# ------------------------------------------------------------------ the Dynamo-style baseline


def test_dynamo_decode_throughput_at_an_itl_target():
    # flat 10 ms steps: only the KV cache limits the batch (100000 / 750 = 133 requests)
    assert decode_max_batch(flat(), 0.05, 750) == 133
    assert decode_throughput_per_replica(flat(), 0.05, 750) == pytest.approx(133 / 0.01)
    # an ITL below the fastest step still leaves batch 1 (never zero throughput)
    assert decode_throughput_per_replica(flat(), 0.005, 750) == pytest.approx(1 / 0.01)
    # 10 ms + 0.001 ms per context token: at 750 tokens each, 50 ms allows 53 requests
    slow = flat(per_ctx_ms=0.001)
    assert decode_max_batch(slow, 0.05, 750) == 53
    assert decode_throughput_per_replica(slow, 0.05, 750) == pytest.approx(53 / (0.010 + 53 * 0.75e-3))


def test_dynamo_throughput_plan_and_correction_factors():
    ctl = DynamoPlannerController(flat(), flat(), 0.5, 0.05, max_batch_tokens=2048)
    s = _Sample(prompt_tokens_per_s=50_000.0, mean_prompt=500.0, gen_tokens_per_s=50_000.0, ttft=None, itl=None,
                decode_batch=None)
    # prefill: 4 x 500 tokens per 100 ms batch = 20000 tok/s per replica -> ceil(50000 / 20000) = 3
    # decode: 100 req/s, OSL 500, context 750, 13300 tok/s per replica -> ceil(50000 / 13300) = 4
    assert ctl.plan(s, s) == {"prefill": 3, "decode": 4}
    # TTFT above the profile's: min(1, correction) leaves prefill alone; below it (prefix hits) lowers it
    assert ctl.plan(_Sample(**{**s.__dict__, "ttft": 0.2}), s)["prefill"] == 3
    assert ctl.plan(_Sample(**{**s.__dict__, "ttft": 0.05}), s)["prefill"] == 2
    # ITL twice the profile's: the ITL target halves (50 -> 25 ms) and so does the batch a replica may run
    slow = DynamoPlannerController(flat(), flat(per_ctx_ms=0.001), 0.5, 0.05)
    base = slow.plan(s, s)["decode"]
    assert base == math.ceil(50_000 / (53 / (0.010 + 53 * 0.75e-3)))
    worse = _Sample(**{**s.__dict__, "itl": 2 * flat(per_ctx_ms=0.001).decode_step_s(10, 7500), "decode_batch": 10})
    assert slow.plan(worse, s)["decode"] == math.ceil(50_000 / (20 / (0.010 + 20 * 0.75e-3)))
    assert DynamoPlannerController(flat(), flat(), 0.5, 0.05, correction=False).plan(worse, s) == ctl.plan(s, s)
    with pytest.raises(ValueError):
        DynamoPlannerController(flat(), flat(), 0.5, 0.05, predictor="prophet")


def test_dynamo_load_steps_are_one_at_a_time_and_blocked_while_scaling():
    from baton.operator.autoscale_policy import RoleObservation
    ctl = DynamoPlannerController(flat(), flat(per_ctx_ms=0.001), 0.5, 0.05)
    # a worker prefills 20000 tok/s x 0.5 s = 10000 tokens within the TTFT target
    over = RoleObservation(queue_tokens=2 * 10_000.0, prefill_tokens_per_s=20_000.0, mean_prompt_tokens=500.0,
                           current_replicas=2, ready_replicas=2)
    assert ctl.load_step("prefill", over, None) == 1
    assert ctl.load_step("prefill", replace(over, current_replicas=3), None) == 0      # a step still starting
    assert ctl.load_step("prefill", replace(over, queue_tokens=0.0), None) == -1
    assert ctl.load_step("prefill", replace(over, queue_tokens=0.0, current_replicas=1, ready_replicas=1),
                         None) == 0                                                     # never below one
    # decode: 53 requests of 750 tokens (39750 KV tokens) meet the ITL target; 95% of 100000 is more
    d = RoleObservation(kv_cache_usage=0.95, current_replicas=2, ready_replicas=2)
    assert ctl.load_step("decode", d, 750.0) == 1
    assert ctl.load_step("decode", replace(d, kv_cache_usage=0.1), 750.0) == -1        # < 39750 x 1/2 x 80%
    assert ctl.load_step("decode", replace(d, kv_cache_usage=0.3), 750.0) == 0


def test_dynamo_controller_keeps_the_throughput_floor_and_steps_above_it():
    prof = WorkerProfile.builtin(1)
    tr = poisson_requests([(0, 2), (300, 10)], 900, PROMPT, OUTPUT, 3)
    cfg = SimConfig(prof, prof, ttft_slo_s=0.4, tpot_slo_s=0.05)
    ctl = DynamoPlannerController(prof, prof, 0.4, 0.05, throughput_interval_s=180.0)
    seen = []

    def watched(obs):
        out = ctl(obs)
        seen.append((obs, out))
        return out

    res = simulate(cfg, tr, watched)
    reasons = {why for _, out in seen for _, why in out.values()}
    assert {"LoadUp", "ThroughputFloor"} <= reasons and max(pt.decode_replicas for pt in res.timeline) > 1
    # load-based steps are +1, and never taken while the previous step's replicas still start
    for obs, out in seen:
        for role in ("prefill", "decode"):
            o, (want, why) = obs.role(role), out[role]
            if why == "LoadUp":
                assert want == o.current_replicas + 1 and o.ready_replicas == o.current_replicas
