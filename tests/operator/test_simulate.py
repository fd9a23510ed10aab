"""The autoscaling simulator's accounting on hand-computable traces, determinism, speed, and the CLI."""
import argparse
import json
import time

import pytest
from baton.operator.autoscale_policy import PolicyConfig, RoleBounds
from baton.operator.simulate import BatonController, SimConfig, fixed_controller, simulate
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
    for bad in (["simulate", "--bursts", "1,2"], ["simulate", "--trace", str(tmp_path / "missing.jsonl")],
                ["simulate", "--profile", str(trace)], ["simulate", "--fixed", "x"],
                ["simulate", "--input-len", "lognormal:0:1"], ["simulate", "--profile", str(cal), "--prefill-tp", "2"]):
        args = ap.parse_args(bad)
        with pytest.raises(CommandError):
            args.func(args)
