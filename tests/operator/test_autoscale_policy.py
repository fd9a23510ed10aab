"""Unit tests of the pure SLO autoscaling policy (operator/autoscale_policy.py), one per rule."""
import itertools
import json
import math

import pytest
from baton.operator.api import LLMServiceSpec
from baton.operator.autoscale_forecast import ArrivalModel
from baton.operator.autoscale_policy import (
    History,
    Observations,
    PolicyConfig,
    RoleBounds,
    RoleObservation,
    decide,
)

SLO_TTFT, SLO_TPOT = 0.5, 0.05
CAP = 8000.0  # prefill tokens/s per replica


def cfg(**kw) -> PolicyConfig:
    # rules in isolation: no stabilization, no warm-up, no arrival band (scale-down sizes for the current rate)
    base = {"ttft_slo_s": SLO_TTFT, "tpot_slo_s": SLO_TPOT, "prefill": RoleBounds(1, 8),
            "decode": RoleBounds(1, 8), "scale_down_stabilization_s": 0.0, "warmup_s": 0.0,
            "headroom_k": 0.0, "headroom_memory_s": 0.0}
    base.update(kw)
    return PolicyConfig(**base)


def pre(n=2, ready=None, **kw) -> RoleObservation:
    d = {"ttft_p90_s": 0.2, "queue_tokens": 0.0, "prompt_tokens_per_s": 0.7 * CAP * n,
         "prefill_tokens_per_s": CAP, "current_replicas": n, "ready_replicas": n if ready is None else ready}
    d.update(kw)
    return RoleObservation(**d)


def dec(n=2, ready=None, **kw) -> RoleObservation:
    d = {"tpot_p90_s": 0.04, "kv_cache_usage": 0.5, "num_waiting": 0.0, "num_running": 40.0,
         "current_replicas": n, "ready_replicas": n if ready is None else ready}
    d.update(kw)
    return RoleObservation(**d)


def run(p, d, config=None, history=None, now=1000.0):
    history = history or History.from_dict({r: {"started": 0.0} for r in ("prefill", "decode")})
    return decide(Observations(p, d, window_s=30.0, now_s=now), config or cfg(), history)


def test_from_spec_takes_slo_bounds_and_windows():
    spec = LLMServiceSpec.model_validate({
        "model": {"name": "m", "source": {"uri": "hf://x"}},
        "slo": {"ttft": "200ms", "tpot": "40ms", "attainment": 0.95},
        "prefill": {"autoscaling": {"minReplicas": 2, "maxReplicas": 6}},
        "decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
        "autoscaling": {"interval": "10s", "scaleUpStabilization": "30s", "scaleDownStabilization": "2m"}})
    c = PolicyConfig.from_spec(spec, warmup_s=5.0)
    assert (c.ttft_slo_s, c.tpot_slo_s, c.attainment) == (0.2, 0.04, 0.95)
    assert c.prefill == RoleBounds(2, 6) and c.decode == RoleBounds(1, 3)
    assert (c.interval_s, c.scale_up_stabilization_s, c.scale_down_stabilization_s, c.warmup_s) == (10, 30, 120, 5)


def test_within_slo_holds():
    ds, _ = run(pre(), dec())
    assert ds["prefill"].desired == 2 and ds["prefill"].reason == "WithinSLO"
    assert ds["decode"].desired == 2 and ds["decode"].reason == "WithinSLO"


def test_ttft_above_slo_scales_prefill_proportionally():
    ds, h = run(pre(ttft_p90_s=1.0), dec())
    p = ds["prefill"]
    assert (p.current, p.desired, p.reason) == (2, 4, "TTFTAboveSLO")
    assert "1000ms" in p.message and "500ms" in p.message
    assert h.prefill.last_scale_time_s == 1000.0 and h.prefill.last_scale_up_time_s == 1000.0
    assert ds["decode"].desired == 2


def test_queue_backlog_scales_prefill_even_with_good_ttft():
    # router TTFT only sees requests that got a token: a growing queue is invisible to it
    ds, _ = run(pre(queue_tokens=3 * CAP, prompt_tokens_per_s=1.5 * CAP), dec())
    need = math.ceil((1.5 * CAP + 3 * CAP / 60) / (CAP * 0.75))
    assert ds["prefill"].reason == "QueueBacklog" and ds["prefill"].desired == need == 3


def test_backlog_without_rate_sizes_on_queue():
    ds, _ = run(pre(queue_tokens=2 * CAP, prompt_tokens_per_s=None), dec())
    assert ds["prefill"].reason == "QueueBacklog" and ds["prefill"].desired == 4   # step limit +2


def test_num_waiting_times_mean_prompt_stands_in_for_queue_tokens():
    ds, _ = run(pre(queue_tokens=None, num_waiting=40, mean_prompt_tokens=400, prompt_tokens_per_s=None), dec())
    assert ds["prefill"].reason == "QueueBacklog"


def test_load_above_capacity_scales_prefill():
    ds, _ = run(pre(prompt_tokens_per_s=2.5 * CAP), dec())
    assert ds["prefill"].reason == "LoadAboveCapacity" and ds["prefill"].desired == 4


def test_tpot_above_slo_scales_decode():
    ds, _ = run(pre(), dec(tpot_p90_s=0.08))
    assert (ds["decode"].desired, ds["decode"].reason) == (4, "TPOTAboveSLO")


def test_kv_cache_pressure_scales_decode_and_counts_waiting():
    ds, _ = run(pre(), dec(kv_cache_usage=0.9))
    assert ds["decode"].reason == "KVCachePressure" and ds["decode"].desired == 3   # 1.8 / 0.6
    ds, _ = run(pre(), dec(kv_cache_usage=0.9, num_waiting=40, num_running=40))
    assert ds["decode"].reason == "KVCachePressure" and ds["decode"].desired == 4   # step limit (6 wanted)


def test_no_data_holds_and_records_nothing():
    empty = RoleObservation(current_replicas=3, ready_replicas=3)
    ds, h = run(empty, RoleObservation(current_replicas=2, ready_replicas=2))
    assert (ds["prefill"].desired, ds["prefill"].reason) == (3, "NoData")
    assert (ds["decode"].desired, ds["decode"].reason) == (2, "NoData")
    assert h.prefill.recommendations == () and h.decode.recommendations == ()
    ds, _ = run(RoleObservation(), dec())
    assert ds["prefill"].reason == "NoData"


def test_missing_metrics_are_not_zero_but_observed_idle_scales_down():
    # latency missing because no traffic, and the load metrics say so: may scale down
    idle = pre(n=3, ttft_p90_s=None, prompt_tokens_per_s=0.0)
    ds, _ = run(idle, dec(n=3, tpot_p90_s=None, kv_cache_usage=0.0, num_running=0.0))
    assert ds["prefill"].reason == "BelowSLOScaleDown" and ds["prefill"].desired == 2
    assert ds["decode"].reason == "BelowSLOScaleDown" and ds["decode"].desired == 2
    # latency missing and load unknown: hold
    ds, _ = run(pre(n=3, ttft_p90_s=None, prompt_tokens_per_s=None, queue_tokens=None), dec(n=3))
    assert ds["prefill"].desired == 3 and ds["prefill"].reason == "NoData"


def test_hysteresis_band_holds_between_thresholds():
    low_load = {"prompt_tokens_per_s": 0.1 * CAP}
    ds, _ = run(pre(n=4, ttft_p90_s=0.4, **low_load), dec(n=4, tpot_p90_s=0.04, kv_cache_usage=0.1))
    assert ds["prefill"].desired == 4 and ds["prefill"].reason == "WithinSLO"
    assert ds["decode"].desired == 4 and ds["decode"].reason == "WithinSLO"
    ds, _ = run(pre(n=4, ttft_p90_s=0.2, **low_load), dec(n=4, tpot_p90_s=0.02, kv_cache_usage=0.1))
    assert ds["prefill"].reason == ds["decode"].reason == "BelowSLOScaleDown"


def test_scale_down_needs_low_utilisation_too():
    # fast, but 3 replicas would be over 60% busy
    ds, _ = run(pre(n=4, ttft_p90_s=0.1, prompt_tokens_per_s=2.0 * CAP), dec(n=4, tpot_p90_s=0.02,
                                                                              kv_cache_usage=0.4))
    assert ds["prefill"].desired == 4 and ds["decode"].desired == 4


def test_scale_down_is_one_step_at_a_time():
    ds, _ = run(pre(n=6, ttft_p90_s=0.1, prompt_tokens_per_s=0.0), dec(n=6, tpot_p90_s=0.01, kv_cache_usage=0.0))
    assert ds["prefill"].desired == 5 and ds["decode"].desired == 5


def test_scale_up_step_is_limited():
    ds, _ = run(pre(n=1, ttft_p90_s=50.0), dec(n=5, tpot_p90_s=0.5), config=cfg(prefill=RoleBounds(1, 64),
                                                                               decode=RoleBounds(1, 64)))
    assert ds["prefill"].desired == 3        # factor capped at max_latency_factor (3x)
    assert ds["decode"].desired == 10        # 15 wanted, step max(2, 100%) = +5


def test_at_max_and_min():
    ds, _ = run(pre(n=8, ttft_p90_s=2.0), dec())
    assert (ds["prefill"].desired, ds["prefill"].reason) == (8, "AtMax")
    ds, _ = run(pre(n=1, ttft_p90_s=0.1, prompt_tokens_per_s=0.0), dec())
    assert (ds["prefill"].desired, ds["prefill"].reason) == (1, "AtMin")


def test_scale_down_stabilization_uses_max_over_window():
    c = cfg(scale_down_stabilization_s=300.0)
    h = History.from_dict({r: {"started": 0.0} for r in ("prefill", "decode")})
    _, h = run(pre(n=4), dec(n=4), config=c, history=h, now=1000.0)              # holds at 4
    quiet = {"ttft_p90_s": 0.1, "prompt_tokens_per_s": 0.0}
    ds, h = run(pre(n=4, **quiet), dec(n=4), config=c, history=h, now=1100.0)
    assert ds["prefill"].desired == 4 and ds["prefill"].reason == "Stabilizing"
    ds, h = run(pre(n=4, **quiet), dec(n=4), config=c, history=h, now=1301.0)   # the 4 left the window
    assert ds["prefill"].desired == 3 and ds["prefill"].reason == "BelowSLOScaleDown"


def test_scale_up_stabilization_uses_min_over_window():
    c = cfg(scale_up_stabilization_s=60.0)
    h = History.from_dict({r: {"started": 0.0} for r in ("prefill", "decode")})
    _, h = run(pre(n=2), dec(), config=c, history=h, now=1000.0)
    ds, h = run(pre(n=2, ttft_p90_s=1.0), dec(), config=c, history=h, now=1015.0)
    assert ds["prefill"].desired == 2 and ds["prefill"].reason == "Stabilizing"
    ds, h = run(pre(n=2, ttft_p90_s=1.0), dec(), config=c, history=h, now=1061.0)
    assert ds["prefill"].desired == 4


def test_fresh_autoscaler_watches_a_window_before_scaling_down():
    c = cfg(scale_down_stabilization_s=300.0)
    ds, h = decide(Observations(pre(n=4, ttft_p90_s=0.1, prompt_tokens_per_s=0.0), dec(n=4), 30.0, 5000.0), c,
                   History())
    assert ds["prefill"].desired == 4
    ds, h = decide(Observations(pre(n=4, ttft_p90_s=0.1, prompt_tokens_per_s=0.0), dec(n=4), 30.0, 5301.0), c, h)
    assert ds["prefill"].desired == 3


def test_warming_up_blocks_scale_down_and_latency_driven_scale_up():
    c = cfg(warmup_s=60.0)
    quiet = {"ttft_p90_s": 0.1, "prompt_tokens_per_s": 0.0}
    ds, _ = run(pre(n=4, ready=3, **quiet), dec(), config=c)
    assert (ds["prefill"].desired, ds["prefill"].reason) == (4, "WarmingUp")
    # latency still high from before the new pods: hold, capacity is on its way
    ds, _ = run(pre(n=4, ready=2, ttft_p90_s=1.5), dec(), config=c)
    assert (ds["prefill"].desired, ds["prefill"].reason) == (4, "WarmingUp")
    # but load-driven scale-up still applies
    ds, _ = run(pre(n=4, ready=2, prompt_tokens_per_s=5 * CAP), dec(), config=c)
    assert ds["prefill"].desired == 7 and ds["prefill"].reason == "LoadAboveCapacity"
    # a recent scale-up keeps the role warming up for warmup_s, and one window after the last unready pod
    h = History.from_dict({"prefill": {"started": 0.0, "lastScaleUpTime": 990.0}, "decode": {"started": 0.0}})
    ds, _ = run(pre(n=4, **quiet), dec(), config=c, history=h, now=1000.0)
    assert ds["prefill"].reason == "WarmingUp"
    h = History.from_dict({"prefill": {"started": 0.0, "lastUnready": 980.0}, "decode": {"started": 0.0}})
    ds, _ = run(pre(n=4, **quiet), dec(), config=c, history=h, now=1000.0)
    assert ds["prefill"].reason == "WarmingUp"


def test_ratio_bound_stops_one_loop_running_away_from_the_other():
    c = cfg(max_ratio=2.0, min_ratio=0.5, prefill=RoleBounds(1, 16), decode=RoleBounds(1, 16))
    ds, _ = run(pre(n=4, ttft_p90_s=1.5), dec(n=2), config=c)
    assert (ds["prefill"].desired, ds["prefill"].reason) == (4, "RatioBound")
    ds, _ = run(pre(n=2, ttft_p90_s=1.5), dec(n=2), config=c)
    assert ds["prefill"].desired == 4 and ds["prefill"].reason == "TTFTAboveSLO"
    # decode may not scale down below prefill/max_ratio
    ds, _ = run(pre(n=4), dec(n=2, tpot_p90_s=0.01, kv_cache_usage=0.0), config=c)
    assert (ds["decode"].desired, ds["decode"].reason) == (2, "RatioBound")
    ds, _ = run(pre(n=1), dec(n=2, tpot_p90_s=0.2), config=c)
    assert (ds["decode"].desired, ds["decode"].reason) == (2, "RatioBound")


def test_flapping_latency_does_not_oscillate():
    c = PolicyConfig(ttft_slo_s=SLO_TTFT, tpot_slo_s=SLO_TPOT, prefill=RoleBounds(1, 8), decode=RoleBounds(1, 8))
    h = History()
    p_n, d_n = 2, 2
    p_seq, d_seq = [], []
    for i in range(80):
        high = i % 2 == 0
        p = pre(n=p_n, ttft_p90_s=0.8 if high else 0.1, prompt_tokens_per_s=0.0 if not high else 0.5 * CAP * p_n)
        d = dec(n=d_n, tpot_p90_s=0.06 if high else 0.01, kv_cache_usage=0.0 if not high else 0.5)
        ds, h = decide(Observations(p, d, 30.0, 15.0 * i), c, h)
        p_n, d_n = ds["prefill"].desired, ds["decode"].desired
        p_seq.append(p_n)
        d_seq.append(d_n)
    for seq in (p_seq, d_seq):
        changes = [b - a for a, b in itertools.pairwise(seq) if b != a]
        # never down after up (no oscillation): all increases, then at most a monotone decline
        downs_then_up = any(x < 0 for x in changes) and any(
            changes[j] < 0 and changes[k] > 0 for j in range(len(changes)) for k in range(j + 1, len(changes)))
        assert not downs_then_up, seq
        assert not any(x < 0 for x in changes), seq        # high readings every 30 s keep it from shrinking


def test_history_round_trips_and_prunes():
    _, h = run(pre(ttft_p90_s=1.0), dec(tpot_p90_s=0.1))
    assert History.from_dict(h.to_dict()) == h
    # every field, the arrival model and the pending scale-up included, survives a round trip through JSON
    h = rising_history([0.5 * CAP, 0.8 * CAP, 1.1 * CAP])
    _, h = run(pre(n=4, ready=2, queue_tokens=4 * CAP), dec(num_waiting=2.0), history=h, now=1045.0)
    assert h.prefill.pending_target and h.prefill.pending_signal and h.decode.last_backlog_s
    assert h.arrivals.time_s == 1045.0
    assert History.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    assert History.from_dict(None) == History()
    c = cfg(scale_down_stabilization_s=60.0)
    for t in range(0, 3000, 15):
        _, h = run(pre(), dec(), config=c, history=h, now=2000.0 + t)
    assert len(h.prefill.recommendations) <= (60 + 15) // 15 + 1


# ------------------------------------------------------------------ arrival forecast, guard, TTFT stages


def feed(rates, dt=15.0, t0=1000.0, **kw) -> ArrivalModel:
    m = ArrivalModel()
    for i, r in enumerate(rates):
        m = m.update(r, t0 + i * dt, kw.get("alpha", 0.7), kw.get("beta", 0.5), kw.get("memory_s", 1800.0),
                     kw.get("reset_after_s", 60.0))
    return m


def test_arrival_forecast_extrapolates_a_ramp_and_resets_after_a_gap():
    flat = feed([1000.0] * 10)
    assert flat.forecast(30.0) == pytest.approx(1000.0) and flat.trend == pytest.approx(0.0)
    ramp = feed([1000.0 + 100.0 * i for i in range(12)])          # +100 tok/s every 15 s
    assert ramp.trend == pytest.approx(100.0 / 15, rel=0.05)
    assert ramp.forecast(30.0) == pytest.approx(1000.0 + 1100.0 + 200.0, rel=0.02)
    falling = feed([5000.0 - 400.0 * i for i in range(12)])
    assert falling.forecast(600.0) == 0.0                           # never negative
    gap = ramp.update(3000.0, ramp.time_s + 3600.0, 0.7, 0.5, 1800.0, 60.0)
    assert (gap.level, gap.trend) == (3000.0, 0.0)                 # a slope across a gap means nothing
    assert ArrivalModel().forecast(30.0) is None and ArrivalModel().band(2.0) is None


def test_arrival_band_remembers_bursts_and_forgets_steady_traffic():
    steady = feed([2000.0] * 200)
    assert steady.band(2.0) == pytest.approx(2000.0)
    bursty = feed(([1000.0] * 36 + [8000.0] * 12) * 4)             # 9 min quiet, 3 min burst, 4 times
    assert bursty.band(2.0) > 6000.0
    assert feed(([1000.0] * 36 + [8000.0] * 12) * 4 + [1000.0] * 600).band(2.0) < 1200.0   # 150 min later
    assert ArrivalModel.from_dict(bursty.to_dict()) == bursty and ArrivalModel.from_dict(None) == ArrivalModel()


def rising_history(rates, t0=1000.0) -> History:
    h = History.from_dict({r: {"started": 0.0} for r in ("prefill", "decode")})
    for i, r in enumerate(rates):
        _, h = decide(Observations(pre(prompt_tokens_per_s=r), dec(), 30.0, t0 + 15.0 * i), cfg(), h)
    return h


def test_rising_arrivals_scale_prefill_and_decode_before_latency_moves():
    # 0.5, 1.0, 1.5 x capacity over three evaluations: the current rate needs 2 replicas, the forecast
    # (level 1.36, trend 0.023/s, 30 s ahead: 2.04 x capacity) needs 3
    h = rising_history([0.5 * CAP, 1.0 * CAP])
    ds, h2 = run(pre(prompt_tokens_per_s=1.5 * CAP), dec(kv_cache_usage=0.5), history=h, now=1030.0)
    p, d = ds["prefill"], ds["decode"]
    assert (p.desired, p.reason) == (3, "ArrivalRateRising") and "16320 tok/s forecast 30s ahead" in p.message
    assert (d.desired, d.reason) == (3, "ArrivalRateRising")     # KV 2 x 0.5 x 2.04/1.5 / 0.6 = 2.3
    assert h2.arrivals.trend > 0 and h2.prefill.pending_target == p.desired
    # the same observation without the rising history: within SLO, nothing to do
    ds, _ = run(pre(prompt_tokens_per_s=1.5 * CAP), dec(kv_cache_usage=0.5), history=rising_history([1.5 * CAP]),
                now=1015.0)
    assert ds["prefill"].reason == "WithinSLO" and ds["decode"].reason == "WithinSLO"


def test_pending_scale_guard_does_not_stack_scale_ups_unless_load_got_worse():
    h = History.from_dict({"prefill": {"started": 0.0}, "decode": {"started": 0.0, "pendingTarget": 5,
                                                                    "pendingSignal": 1.4 * CAP},
                           "arrivals": {"time": 985.0, "level": 1.4 * CAP, "mean": 1.4 * CAP}})
    waiting = {"kv_cache_usage": 0.95, "num_waiting": 60.0, "num_running": 40.0}   # wants ceil(6.6) = 7
    p = pre(prompt_tokens_per_s=1.4 * CAP)
    # 3 of 5 replicas still starting, load as when the scale-up to 5 was decided: hold (the backlog grows
    # because the capacity is not there yet, not because there is more load)
    ds, h2 = run(p, dec(n=5, ready=3, **waiting), config=cfg(), history=h)
    assert (ds["decode"].desired, ds["decode"].reason) == (5, "WarmingUp") and "not worse" in ds["decode"].message
    # arrivals rose by more than pending_tolerance: the signal got worse, stack the scale-up
    ds, _ = run(pre(prompt_tokens_per_s=2.0 * CAP), dec(n=5, ready=3, **waiting), config=cfg(), history=h)
    assert ds["decode"].desired == 8 and "KV cache 95% used" in ds["decode"].message   # AtMax
    # once every replica is ready, the pending scale-up is over
    ds, _ = run(p, dec(n=5, ready=5, **waiting), config=cfg(), history=h)
    assert ds["decode"].desired > 5 and h2.decode.pending_target == 5


def staged(queue, compute, handoff=None, first=None, ttft=None, **kw) -> RoleObservation:
    return pre(ttft_p90_s=ttft, prefill_queue_p90_s=queue, prefill_compute_p90_s=compute,
               kv_handoff_p90_s=handoff, first_decode_p90_s=first, **kw)


def test_prefill_scales_on_its_own_ttft_stages():
    # TTFT 0.9s over a 0.5s SLO, but it is the hand-off and first decode: not prefill's to fix
    ds, _ = run(staged(0.05, 0.08, handoff=0.5, first=0.27, ttft=0.9), dec())
    assert ds["prefill"].desired == 2 and ds["prefill"].reason == "WithinSLO"
    # queue + compute over prefill's share (SLO - hand-off - first decode = 0.3s): scale on that ratio
    ds, _ = run(staged(0.4, 0.05, handoff=0.1, first=0.1, ttft=0.65), dec())
    p = ds["prefill"]
    assert (p.desired, p.reason) == (3, "PrefillAboveBudget") and "budget 300ms" in p.message   # 2 x 0.45/0.3
    # the other stages eat the whole SLO: prefill's budget never drops below min_prefill_ttft_share of it
    ds, _ = run(staged(0.2, 0.04, handoff=0.6, first=0.1, ttft=0.94), dec())
    assert ds["prefill"].desired == 2
    ds, _ = run(staged(0.3, 0.1, handoff=0.6, first=0.1, ttft=1.1), dec())
    assert (ds["prefill"].desired, ds["prefill"].reason) == (4, "PrefillAboveBudget")          # 2 x 0.4/0.25
    # no stage data: whole TTFT against the SLO, as before
    ds, _ = run(pre(ttft_p90_s=0.9), dec())
    assert (ds["prefill"].desired, ds["prefill"].reason) == (4, "TTFTAboveSLO")
    # low stages allow a scale-down even when TTFT as a whole is not low
    ds, _ = run(staged(0.01, 0.05, handoff=0.2, first=0.1, ttft=0.36, n=4, prompt_tokens_per_s=0.0), dec(n=4))
    assert ds["prefill"].reason == "BelowSLOScaleDown"


def test_stale_latency_after_a_drained_backlog_does_not_scale_up():
    h = History.from_dict({"prefill": {"started": 0.0, "lastBacklog": 990.0},
                           "decode": {"started": 0.0, "lastBacklog": 990.0}})
    ds, _ = run(pre(ttft_p90_s=2.0), dec(tpot_p90_s=0.3), history=h)
    assert ds["prefill"].desired == 2 and "backlog drained" in ds["prefill"].message
    assert ds["decode"].desired == 2 and "backlog drained" in ds["decode"].message
    # without a recent backlog the same latency is believed
    ds, _ = run(pre(ttft_p90_s=2.0), dec(tpot_p90_s=0.3))
    assert ds["prefill"].desired > 2 and ds["decode"].desired > 2
    # a backlog now is recorded
    _, h3 = run(pre(queue_tokens=4 * CAP), dec(num_waiting=3.0))
    assert h3.prefill.last_backlog_s == h3.decode.last_backlog_s == 1000.0


def test_band_keeps_capacity_for_recent_bursts():
    c = cfg(headroom_k=2.0, headroom_memory_s=1800.0)
    h = History.from_dict({r: {"started": 0.0} for r in ("prefill", "decode")})
    quiet = {"ttft_p90_s": 0.1, "prompt_tokens_per_s": 0.2 * CAP}
    for i in range(4):                            # four bursts of 3 x capacity
        for j in range(48):
            burst = j >= 36
            rate = 3 * CAP if burst else 0.2 * CAP
            _, h = decide(Observations(pre(n=4, ttft_p90_s=0.1, prompt_tokens_per_s=rate),
                                       dec(n=4, tpot_p90_s=0.01, kv_cache_usage=0.5 if burst else 0.05),
                                       30.0, 15.0 * (48 * i + j)), c, h)
    ds, _ = decide(Observations(pre(n=4, **quiet), dec(n=4, tpot_p90_s=0.01, kv_cache_usage=0.05), 30.0,
                                15.0 * 48 * 4), c, h)
    assert ds["prefill"].desired == 4 and "swinging" in ds["prefill"].message
    assert ds["decode"].desired == 4 and "arrival swings" in ds["decode"].message
    ds, _ = run(pre(n=4, **quiet), dec(n=4, tpot_p90_s=0.01, kv_cache_usage=0.05), config=c)   # no history
    assert ds["prefill"].desired < 4 and ds["decode"].desired < 4
