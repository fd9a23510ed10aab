"""Unit tests of the pure SLO autoscaling policy (operator/autoscale_policy.py), one per rule."""
import itertools
import math

from baton.operator.api import LLMServiceSpec
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
    base = {"ttft_slo_s": SLO_TTFT, "tpot_slo_s": SLO_TPOT, "prefill": RoleBounds(1, 8),
            "decode": RoleBounds(1, 8), "scale_down_stabilization_s": 0.0, "warmup_s": 0.0}
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
    assert History.from_dict(None) == History()
    c = cfg(scale_down_stabilization_s=60.0)
    for t in range(0, 3000, 15):
        _, h = run(pre(), dec(), config=c, history=h, now=2000.0 + t)
    assert len(h.prefill.recommendations) <= (60 + 15) // 15 + 1
