"""The per-role rules of the SLO autoscaling policy (operator/autoscale_policy.py): from one role's observation
to a raw recommendation (`Want`), before warm-up, stabilization, rate limits and the ratio bound. Pure.

Prefill: latency (queue wait + compute against prefill's share of the TTFT budget when the router reports TTFT
stages, else the whole TTFT against the SLO), the queue backlog, the arrival rate against measured capacity, and
the arrival *forecast* (`ArrivalRateRising`: capacity for where arrivals are heading, not where they were).
Decode: TPOT, KV-cache pressure, and the same forecast applied to the KV cache in use. Scale-down sizes for the
band recent arrivals have reached (`Arrivals.band`), not for the current rate alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.operator.autoscale_policy import PolicyConfig, RoleObservation

# Reasons (CamelCase, as Kubernetes condition reasons).
TTFT_ABOVE_SLO = "TTFTAboveSLO"
PREFILL_ABOVE_BUDGET = "PrefillAboveBudget"
ARRIVALS_RISING = "ArrivalRateRising"
QUEUE_BACKLOG = "QueueBacklog"
LOAD_ABOVE_CAPACITY = "LoadAboveCapacity"
TPOT_ABOVE_SLO = "TPOTAboveSLO"
KV_CACHE_PRESSURE = "KVCachePressure"
BELOW_SLO_SCALE_DOWN = "BelowSLOScaleDown"
WITHIN_SLO = "WithinSLO"
NO_DATA = "NoData"
STABILIZING = "Stabilizing"
WARMING_UP = "WarmingUp"
AT_MAX = "AtMax"
AT_MIN = "AtMin"
RATIO_BOUND = "RatioBound"
RATE_LIMITED = "RateLimited"
#: a role whose autoscaling mode is external or off: the policy holds it where it is and keeps no history for it
NOT_MANAGED = "NotManaged"


@dataclass(frozen=True)
class Want:
    """A raw recommendation before stabilization: replicas (None = hold without recording), why, and whether
    it comes from latency (held during warm-up) or from load (counts replicas, applies during warm-up)."""

    replicas: int | None
    reason: str
    message: str
    latency_driven: bool = False


def ceil_up(x: float) -> int:
    return math.ceil(x - 1e-9)


def prefill_queue(o: RoleObservation) -> float | None:
    if o.queue_tokens is not None:
        return o.queue_tokens
    if o.num_waiting is not None and o.mean_prompt_tokens is not None:
        return o.num_waiting * o.mean_prompt_tokens
    return None


@dataclass(frozen=True)
class Arrivals:
    """The arrival model's view for this evaluation (prompt tokens/s; None: no model yet): the forecast for
    when new capacity would serve, and the band recent swings reach (sizes scale-down)."""

    forecast: float | None = None
    band: float | None = None
    horizon_s: float = 0.0
    #: the measured rate the forecast and band are relative to
    rate: float | None = None

    def signal(self) -> float | None:
        """The arrival signal the pending-scale guard compares: the higher of measured and forecast."""
        return None if self.rate is None else max(self.rate, self.forecast or 0.0)

    def rising(self) -> float:
        """How far above the current rate the forecast is (>= 1)."""
        if self.forecast is None or not self.rate or self.forecast <= self.rate:
            return 1.0
        return self.forecast / self.rate

    def growth(self) -> float:
        """How far above the current rate the band is (>= 1): decode's KV in use grows with arrivals."""
        if self.band is None or not self.rate or self.band <= self.rate:
            return 1.0
        return self.band / self.rate


def prefill_latency(o: RoleObservation, c: PolicyConfig) -> tuple[float | None, float, str]:
    """(prefill's latency, its budget, a description). With TTFT stage data: queue wait + compute p90 against
    the SLO minus what hand-off and first decode take (at least `min_prefill_ttft_share` of it); else the
    whole TTFT p90 against the SLO."""
    slo = c.ttft_slo_s
    if o.prefill_queue_p90_s is not None and o.prefill_compute_p90_s is not None:
        other = (o.kv_handoff_p90_s or 0.0) + (o.first_decode_p90_s or 0.0)
        budget = max(slo - other, c.min_prefill_ttft_share * slo)
        lat = o.prefill_queue_p90_s + o.prefill_compute_p90_s
        return lat, budget, (f"prefill queue+compute p90 {lat * 1000:.0f}ms vs its TTFT budget "
                             f"{budget * 1000:.0f}ms (SLO {slo * 1000:.0f}ms, hand-off+first decode "
                             f"{other * 1000:.0f}ms)")
    ttft = o.ttft_p90_s
    return ttft, slo, "" if ttft is None else f"TTFT p90 {ttft * 1000:.0f}ms vs SLO {slo * 1000:.0f}ms"


def prefill_want(o: RoleObservation, c: PolicyConfig, current: int, ready: int, a: Arrivals) -> Want:
    slo = c.ttft_slo_s
    ups: list[Want] = []
    lat, budget, lat_text = prefill_latency(o, c)
    staged = o.prefill_queue_p90_s is not None and o.prefill_compute_p90_s is not None
    if lat is not None and lat > c.up_threshold * budget:
        factor = min(lat / budget, c.max_latency_factor)
        if staged:
            ups.append(Want(max(ceil_up(max(ready, 1) * factor), current + 1), PREFILL_ABOVE_BUDGET,
                             lat_text.replace(" vs ", " > "), latency_driven=True))
        else:
            ups.append(Want(max(ceil_up(max(ready, 1) * factor), current + 1), TTFT_ABOVE_SLO,
                             f"TTFT p90 {lat * 1000:.0f}ms > SLO {slo * 1000:.0f}ms", latency_driven=True))
    queue = prefill_queue(o)
    cap = o.prefill_tokens_per_s
    rate = o.prompt_tokens_per_s
    # demand in prompt tokens per second: arrivals plus draining the queue over drain_horizon_s
    demand = None
    if cap:
        if rate is not None:
            demand = rate + (queue or 0.0) / c.drain_horizon_s
        elif queue is not None:
            demand = queue / (c.backlog_fraction * slo)   # no rate: size on the backlog alone
    backlogged = queue is not None and cap and queue / (cap * max(ready, 1)) > c.backlog_fraction * slo
    if demand is not None and cap:
        need = ceil_up(demand / (cap * c.target_utilisation))
        if need > current:
            if backlogged:
                ups.append(Want(need, QUEUE_BACKLOG,
                                 f"{queue:.0f} queued prompt tokens take {queue / (cap * max(ready, 1)):.2f}s to "
                                 f"drain on {max(ready, 1)} ready replicas at {cap:.0f} tok/s; demand "
                                 f"{demand:.0f} tok/s needs {need}"))
            else:
                ups.append(Want(need, LOAD_ABOVE_CAPACITY,
                                 f"demand {demand:.0f} prompt tok/s needs {need} replicas at {cap:.0f} tok/s "
                                 f"and {c.target_utilisation:.0%} utilisation"))
        if rate is not None and a.forecast is not None and a.forecast > rate:
            ahead = a.forecast + (queue or 0.0) / c.drain_horizon_s
            need_ahead = ceil_up(ahead / (cap * c.target_utilisation))
            if need_ahead > max(need, current):
                ups.append(Want(need_ahead, ARRIVALS_RISING,
                                 f"prompt arrivals {rate:.0f} tok/s and rising: {a.forecast:.0f} tok/s forecast "
                                 f"{a.horizon_s:.0f}s ahead needs {need_ahead} replicas at {cap:.0f} tok/s"))
    if ups:
        return max(ups, key=lambda w: w.replicas or 0)
    # down? latency must be low (or absent because idle), load must fit on fewer replicas.
    load_known = rate is not None or queue is not None or o.busy_fraction is not None
    if lat is None and not load_known:
        return Want(None, NO_DATA, "no TTFT samples and no prefill load metrics")
    if lat is not None and lat >= c.down_threshold * budget:
        return Want(current, WITHIN_SLO, f"{lat_text}: within" if staged else
                     f"TTFT p90 {lat * 1000:.0f}ms within SLO {slo * 1000:.0f}ms")
    lat_desc = "no TTFT samples (idle)" if lat is None else (
        f"{lat_text}: < {c.down_threshold:.0%}" if staged else
        f"TTFT p90 {lat * 1000:.0f}ms < {c.down_threshold:.0%} of SLO {slo * 1000:.0f}ms")
    if current <= 0:
        return Want(current, WITHIN_SLO, lat_desc)
    if backlogged:
        return Want(current, WITHIN_SLO, f"{lat_desc} but {queue:.0f} prompt tokens queued")
    if demand is not None and cap:
        held = ""
        if rate is not None and a.band is not None and a.band > rate:
            # keep the capacity for the swings recent traffic has shown (the band), not just for now
            demand += a.band - rate
            held = f" (arrivals have been swinging up to {a.band:.0f} tok/s)"
        target = ceil_up(demand / (cap * c.scale_down_utilisation)) if demand > 0 else 0
        if target >= current:
            return Want(current, WITHIN_SLO, f"{lat_desc} but demand {demand:.0f} tok/s{held} would make "
                         f"{current - 1} replicas more than {c.scale_down_utilisation:.0%} busy")
        return Want(target, BELOW_SLO_SCALE_DOWN, f"{lat_desc}; demand {demand:.0f} prompt tok/s{held} fits on "
                     f"{target} replicas at {cap:.0f} tok/s")
    if o.busy_fraction is not None:
        busy = o.busy_fraction * max(ready, 1)   # busy replica-equivalents
        target = ceil_up(busy / c.scale_down_utilisation) if busy > 0 else 0
        if target >= current:
            return Want(current, WITHIN_SLO, f"{lat_desc} but {o.busy_fraction:.0%} busy")
        return Want(target, BELOW_SLO_SCALE_DOWN, f"{lat_desc}; {o.busy_fraction:.0%} busy fits on {target}")
    if lat is None or (queue is not None and queue > 0):
        return Want(current, WITHIN_SLO, f"{lat_desc}; no prefill utilisation metric to size a scale-down")
    return Want(current - 1, BELOW_SLO_SCALE_DOWN, f"{lat_desc}, queue empty")


def decode_want(o: RoleObservation, c: PolicyConfig, current: int, ready: int, a: Arrivals) -> Want:
    slo = c.tpot_slo_s
    ups: list[Want] = []
    tpot = o.tpot_p90_s
    base = max(ready, 1)
    if tpot is not None and tpot > c.up_threshold * slo:
        factor = min(tpot / slo, c.max_latency_factor)
        ups.append(Want(max(ceil_up(base * factor), current + 1), TPOT_ABOVE_SLO,
                         f"TPOT p90 {tpot * 1000:.1f}ms > SLO {slo * 1000:.1f}ms", latency_driven=True))
    kv = o.kv_cache_usage
    waiting = o.num_waiting
    if kv is not None and (kv > c.kv_high or (waiting and kv > c.kv_target)):
        # KV demand in replica-equivalents: what is in use, plus the waiting requests at the mean KV share of
        # a running one (KV usage saturates at 100%, the queue says by how much)
        used = kv * base
        extra = 0.0
        if waiting and o.num_running:
            extra = waiting * used / o.num_running
        elif waiting:
            extra = 1.0
        need = max(ceil_up((used + extra) / c.kv_target), ready + 1)
        detail = f"; {waiting:.0f} requests wait for KV" if waiting else ""
        ups.append(Want(need, KV_CACHE_PRESSURE,
                         f"KV cache {kv:.0%} used (> {c.kv_high:.0%} or with a queue){detail}: "
                         f"{need} replicas for {c.kv_target:.0%} usage"))
    g = a.rising()
    if kv is not None and g > 1:
        # arrivals are rising: the KV in use will follow them (decode reaches steady state in seconds)
        need = ceil_up(kv * base * g / c.kv_target)
        if need > current:
            ups.append(Want(need, ARRIVALS_RISING,
                             f"prompt arrivals rising {g:.1f}x ({a.rate:.0f} -> {a.forecast:.0f} tok/s in "
                             f"{a.horizon_s:.0f}s): KV cache {kv:.0%} used grows to need {need} replicas for "
                             f"{c.kv_target:.0%} usage"))
    if ups:
        return max(ups, key=lambda w: w.replicas or 0)
    load_known = kv is not None or o.num_running is not None
    if tpot is None and not load_known:
        return Want(None, NO_DATA, "no TPOT samples and no decode load metrics")
    if tpot is not None and tpot >= c.down_threshold * slo:
        return Want(current, WITHIN_SLO, f"TPOT p90 {tpot * 1000:.1f}ms within SLO {slo * 1000:.1f}ms")
    lat = "no TPOT samples (idle)" if tpot is None else (
        f"TPOT p90 {tpot * 1000:.1f}ms < {c.down_threshold:.0%} of SLO {slo * 1000:.1f}ms")
    if current <= 0:
        return Want(current, WITHIN_SLO, lat)
    if waiting is not None and waiting > 0:
        return Want(current, WITHIN_SLO, f"{lat} but {waiting:.0f} requests waiting")
    if kv is not None:
        # replica-equivalents of KV cache in use, grown to the arrival band (KV in use follows arrivals)
        g = a.growth()
        used = kv * ready * g
        held = f" (x{g:.1f} for the arrival swings recently seen)" if g > 1 else ""
        target = ceil_up(used / c.kv_low) if used > 0 else 0
        if target == 0 and o.num_running:
            target = 1
        if target >= current:
            return Want(current, WITHIN_SLO, f"{lat} but KV cache{held} would be over {c.kv_low:.0%} used on "
                         f"{current - 1} replicas")
        return Want(target, BELOW_SLO_SCALE_DOWN, f"{lat}; KV cache {kv:.0%} used{held} fits on {target} "
                     "replicas")
    if o.num_running is not None and o.num_running == 0 and tpot is None:
        return Want(current - 1, BELOW_SLO_SCALE_DOWN, f"{lat}, nothing running")
    return Want(current, WITHIN_SLO, f"{lat}; no KV-cache metric to size a scale-down")


def backlog_now(role: str, o: RoleObservation, c: PolicyConfig, ready: int) -> bool | None:
    """Whether requests are queueing now (None: not measured): decode has requests waiting for KV; prefill has
    a queue that takes more than `backlog_fraction` of the TTFT SLO to drain on the ready replicas."""
    if role == "decode":
        return None if o.num_waiting is None else o.num_waiting > 0
    queue, cap = prefill_queue(o), o.prefill_tokens_per_s
    if queue is None or not cap:
        return None
    return queue / (cap * max(ready, 1)) > c.backlog_fraction * c.ttft_slo_s


def fits_ready(role: str, o: RoleObservation, c: PolicyConfig, ready: int, a: Arrivals) -> bool:
    """Whether the measured load fits the ready replicas: prefill's arrivals (forecast included) at
    `target_utilisation` of its measured capacity; decode's KV usage under `kv_high`."""
    if role == "decode":
        return o.kv_cache_usage is not None and o.kv_cache_usage <= c.kv_high
    cap, rate = o.prefill_tokens_per_s, o.prompt_tokens_per_s
    if not cap or rate is None:
        return False
    return ceil_up(max(rate, a.forecast or 0.0) / (cap * c.target_utilisation)) <= max(ready, 1)
