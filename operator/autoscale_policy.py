"""The SLO autoscaling policy: pure functions from observations to replica decisions (no I/O, no clock).

Prefill is scaled on TTFT (router-measured p90) and on its prompt backlog; decode on TPOT (p90) and on KV-cache
pressure. `decide` is called every `interval` by the autoscaler timer (operator/autoscaler.py) and by the
simulator (operator/simulate.py), with the `History` it returned last time.

Per role, one evaluation goes:

1. **Raw recommendation** (what the signals ask for, clamped to min/max):
   - prefill up: TTFT p90 > `up_threshold`×SLO -> `ceil(ready × p90/SLO)` (`TTFTAboveSLO`); queued prompt tokens
     that the role cannot drain within `backlog_fraction`×TTFT-SLO at its measured throughput ->
     `ceil(queue / (tokens_per_s × backlog_fraction × SLO))` (`QueueBacklog`); incoming prompt-token rate above
     `target_utilisation` of capacity -> `ceil(rate / (tokens_per_s × target))` (`LoadAboveCapacity`).
   - decode up: TPOT p90 > `up_threshold`×SLO -> `ceil(ready × p90/SLO)` (`TPOTAboveSLO`); KV-cache usage >
     `kv_high` or requests waiting for KV -> `ceil(ready × usage / kv_target)` (`KVCachePressure`).
   - down (both): only when latency is < `down_threshold`×SLO (hysteresis band: between the two thresholds the
     recommendation is "hold") *and* utilisation is low: the load would still fit comfortably on one replica
     less (`BelowSLOScaleDown`). Idle roles (no latency samples because no traffic, but load metrics that
     say zero) may scale down too; missing metrics never count as zero.
   - no usable signal at all -> hold (`NoData`), and nothing is recorded.
2. **Warm-up**: while a role has not-ready replicas or scaled up less than `warmup_s` ago, it does not scale
   down, and latency-driven scale-up is held (capacity is already on its way and the latency window is stale);
   load-driven scale-up (backlog, KV, rate), which counts replicas rather than reading latency, still applies.
3. **Stabilization** (as the HPA's behavior): the recommendation is recorded; the role scales up to the *lowest*
   recommendation over the scale-up window and down to the *highest* over the scale-down window. Alternating
   high/low latency therefore ratchets up at most and never oscillates.
4. **Rate limits**: up by at most `max(max_up_pods, ceil(current × max_up_percent))`, down by `max_down_pods`.
5. **Ratio bound**: prefill:decode replicas stays within [`min_ratio`, `max_ratio`]: a role is not allowed to
   move in the direction that breaks the bound, so the two loops cannot fight each other.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.operator.api import LLMServiceSpec

ROLES: tuple[str, str] = ("prefill", "decode")

# Reasons (CamelCase, as Kubernetes condition reasons).
TTFT_ABOVE_SLO = "TTFTAboveSLO"
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


# ------------------------------------------------------------------------------------------ observations


@dataclass(frozen=True)
class RoleObservation:
    """What was measured for one role over the last window. Every field is optional: None means "no data"
    (never zero). Counts (`queue_tokens`, `num_waiting`, `num_running`) are summed over the role's pods;
    `kv_cache_usage` and `busy_fraction` are averages over its pods; `prefill_tokens_per_s` is the measured
    prefill capacity of one replica (prompt tokens per second while busy)."""

    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    queue_tokens: float | None = None
    num_waiting: float | None = None
    mean_prompt_tokens: float | None = None
    prompt_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    kv_cache_usage: float | None = None
    num_running: float | None = None
    busy_fraction: float | None = None
    current_replicas: int | None = None
    ready_replicas: int | None = None


@dataclass(frozen=True)
class Observations:
    """Both roles' observations; `window_s` is the measurement window, `now_s` the evaluation time (any epoch,
    seconds, monotonic across calls)."""

    prefill: RoleObservation
    decode: RoleObservation
    window_s: float
    now_s: float

    def role(self, name: str) -> RoleObservation:
        return getattr(self, name)


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RoleBounds:
    min_replicas: int = 1
    max_replicas: int = 8


@dataclass(frozen=True)
class PolicyConfig:
    """Tunables of the policy. `from_spec` fills SLOs, bounds and windows from an LLMService; the rest are
    defaults chosen on the simulator benchmark (benchmarks/autoscale.py)."""

    ttft_slo_s: float = 0.5
    tpot_slo_s: float = 0.05
    attainment: float = 0.9
    prefill: RoleBounds = field(default_factory=RoleBounds)
    decode: RoleBounds = field(default_factory=RoleBounds)
    interval_s: float = 15.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    #: scale up by at most max(max_up_pods, ceil(current * max_up_percent)) per evaluation
    max_up_pods: int = 2
    max_up_percent: float = 1.0
    #: scale down by at most this many replicas per evaluation
    max_down_pods: int = 1
    #: hysteresis: up when p90 > up_threshold x SLO, down only when p90 < down_threshold x SLO
    up_threshold: float = 1.0
    down_threshold: float = 0.6
    #: cap on the latency ratio used for proportional scale-up (p90/SLO)
    max_latency_factor: float = 3.0
    #: a queue that takes more than this share of the TTFT SLO to drain on the ready replicas is a backlog
    backlog_fraction: float = 0.5
    #: prefill sizing adds queue / drain_horizon_s to the arrival rate (about a pod start-up)
    drain_horizon_s: float = 60.0
    #: prefill busy share that the rate-based sizing aims for (up) and must stay under after a scale-down
    target_utilisation: float = 0.75
    scale_down_utilisation: float = 0.6
    #: decode KV-cache: pressure above kv_high, sized to kv_target; down only if usage after removal < kv_low
    kv_high: float = 0.8
    kv_target: float = 0.6
    kv_low: float = 0.45
    #: no scale-down (and no latency-driven scale-up) this long after a scale-up of the role
    warmup_s: float = 60.0
    #: prefill:decode replica ratio bounds
    min_ratio: float = 0.125
    max_ratio: float = 8.0

    def bounds(self, role: str) -> RoleBounds:
        return getattr(self, role)

    @classmethod
    def from_spec(cls, spec: LLMServiceSpec, **overrides: Any) -> PolicyConfig:
        """Targets and bounds from an LLMService spec; keyword overrides for the other tunables."""
        a = spec.autoscaling
        values: dict[str, Any] = {
            "ttft_slo_s": spec.slo.ttft.seconds,
            "tpot_slo_s": spec.slo.tpot.seconds,
            "attainment": spec.slo.attainment,
            "prefill": RoleBounds(spec.prefill.autoscaling.min_replicas, spec.prefill.autoscaling.max_replicas),
            "decode": RoleBounds(spec.decode.autoscaling.min_replicas, spec.decode.autoscaling.max_replicas),
            "interval_s": a.interval.seconds,
            "scale_up_stabilization_s": a.scale_up_stabilization.seconds,
            "scale_down_stabilization_s": a.scale_down_stabilization.seconds,
        }
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------------------ history


@dataclass(frozen=True)
class Recommendation:
    time_s: float
    replicas: int


@dataclass(frozen=True)
class RoleHistory:
    recommendations: tuple[Recommendation, ...] = ()
    last_scale_time_s: float | None = None
    last_scale_up_time_s: float | None = None
    last_scale_reason: str | None = None
    #: first evaluation of this role: no scale-down before a whole scale-down window has been watched
    started_s: float | None = None
    #: last evaluation that saw not-ready replicas (warm-up lasts one observation window after it)
    last_unready_s: float | None = None


@dataclass(frozen=True)
class History:
    """What `decide` remembers between evaluations; returned updated, never mutated. `to_dict`/`from_dict` make
    it storable (e.g. in the LLMService status) so an operator restart keeps its stabilization windows."""

    prefill: RoleHistory = field(default_factory=RoleHistory)
    decode: RoleHistory = field(default_factory=RoleHistory)

    def role(self, name: str) -> RoleHistory:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {r: {"recommendations": [[x.time_s, x.replicas] for x in self.role(r).recommendations],
                    "lastScaleTime": self.role(r).last_scale_time_s,
                    "lastScaleUpTime": self.role(r).last_scale_up_time_s,
                    "lastScaleReason": self.role(r).last_scale_reason,
                    "started": self.role(r).started_s,
                    "lastUnready": self.role(r).last_unready_s} for r in ROLES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> History:
        if not data:
            return cls()
        roles = {}
        for r in ROLES:
            d = data.get(r) or {}
            roles[r] = RoleHistory(
                recommendations=tuple(Recommendation(float(t), int(n)) for t, n in d.get("recommendations", [])),
                last_scale_time_s=d.get("lastScaleTime"),
                last_scale_up_time_s=d.get("lastScaleUpTime"),
                last_scale_reason=d.get("lastScaleReason"),
                started_s=d.get("started"),
                last_unready_s=d.get("lastUnready"),
            )
        return cls(**roles)


# ------------------------------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class RoleDecision:
    role: str
    current: int
    desired: int
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return self.desired != self.current


@dataclass(frozen=True)
class _Want:
    """A raw recommendation before stabilization: replicas (None = hold without recording), why, and whether
    it comes from latency (held during warm-up) or from load (counts replicas, applies during warm-up)."""

    replicas: int | None
    reason: str
    message: str
    latency_driven: bool = False


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def _prefill_queue(o: RoleObservation) -> float | None:
    if o.queue_tokens is not None:
        return o.queue_tokens
    if o.num_waiting is not None and o.mean_prompt_tokens is not None:
        return o.num_waiting * o.mean_prompt_tokens
    return None


def _prefill_want(o: RoleObservation, c: PolicyConfig, current: int, ready: int) -> _Want:
    slo = c.ttft_slo_s
    ups: list[_Want] = []
    ttft = o.ttft_p90_s
    if ttft is not None and ttft > c.up_threshold * slo:
        factor = min(ttft / slo, c.max_latency_factor)
        ups.append(_Want(max(_ceil(max(ready, 1) * factor), current + 1), TTFT_ABOVE_SLO,
                         f"TTFT p90 {ttft * 1000:.0f}ms > SLO {slo * 1000:.0f}ms", latency_driven=True))
    queue = _prefill_queue(o)
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
        need = _ceil(demand / (cap * c.target_utilisation))
        if need > current:
            if backlogged:
                ups.append(_Want(need, QUEUE_BACKLOG,
                                 f"{queue:.0f} queued prompt tokens take {queue / (cap * max(ready, 1)):.2f}s to "
                                 f"drain on {max(ready, 1)} ready replicas at {cap:.0f} tok/s; demand "
                                 f"{demand:.0f} tok/s needs {need}"))
            else:
                ups.append(_Want(need, LOAD_ABOVE_CAPACITY,
                                 f"demand {demand:.0f} prompt tok/s needs {need} replicas at {cap:.0f} tok/s "
                                 f"and {c.target_utilisation:.0%} utilisation"))
    if ups:
        return max(ups, key=lambda w: w.replicas or 0)
    # down? latency must be low (or absent because idle), load must fit on fewer replicas.
    load_known = rate is not None or queue is not None or o.busy_fraction is not None
    if ttft is None and not load_known:
        return _Want(None, NO_DATA, "no TTFT samples and no prefill load metrics")
    if ttft is not None and ttft >= c.down_threshold * slo:
        return _Want(current, WITHIN_SLO, f"TTFT p90 {ttft * 1000:.0f}ms within SLO {slo * 1000:.0f}ms")
    lat = "no TTFT samples (idle)" if ttft is None else (
        f"TTFT p90 {ttft * 1000:.0f}ms < {c.down_threshold:.0%} of SLO {slo * 1000:.0f}ms")
    if current <= 0:
        return _Want(current, WITHIN_SLO, lat)
    if backlogged:
        return _Want(current, WITHIN_SLO, f"{lat} but {queue:.0f} prompt tokens queued")
    if demand is not None and cap:
        target = _ceil(demand / (cap * c.scale_down_utilisation)) if demand > 0 else 0
        if target >= current:
            return _Want(current, WITHIN_SLO, f"{lat} but demand {demand:.0f} tok/s would make {current - 1} "
                         f"replicas more than {c.scale_down_utilisation:.0%} busy")
        return _Want(target, BELOW_SLO_SCALE_DOWN, f"{lat}; demand {demand:.0f} prompt tok/s fits on "
                     f"{target} replicas at {cap:.0f} tok/s")
    if o.busy_fraction is not None:
        busy = o.busy_fraction * max(ready, 1)   # busy replica-equivalents
        target = _ceil(busy / c.scale_down_utilisation) if busy > 0 else 0
        if target >= current:
            return _Want(current, WITHIN_SLO, f"{lat} but {o.busy_fraction:.0%} busy")
        return _Want(target, BELOW_SLO_SCALE_DOWN, f"{lat}; {o.busy_fraction:.0%} busy fits on {target}")
    if ttft is None or (queue is not None and queue > 0):
        return _Want(current, WITHIN_SLO, f"{lat}; no prefill utilisation metric to size a scale-down")
    return _Want(current - 1, BELOW_SLO_SCALE_DOWN, f"{lat}, queue empty")


def _decode_want(o: RoleObservation, c: PolicyConfig, current: int, ready: int) -> _Want:
    slo = c.tpot_slo_s
    ups: list[_Want] = []
    tpot = o.tpot_p90_s
    base = max(ready, 1)
    if tpot is not None and tpot > c.up_threshold * slo:
        factor = min(tpot / slo, c.max_latency_factor)
        ups.append(_Want(max(_ceil(base * factor), current + 1), TPOT_ABOVE_SLO,
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
        need = max(_ceil((used + extra) / c.kv_target), ready + 1)
        detail = f"; {waiting:.0f} requests wait for KV" if waiting else ""
        ups.append(_Want(need, KV_CACHE_PRESSURE,
                         f"KV cache {kv:.0%} used (> {c.kv_high:.0%} or with a queue){detail}: "
                         f"{need} replicas for {c.kv_target:.0%} usage"))
    if ups:
        return max(ups, key=lambda w: w.replicas or 0)
    load_known = kv is not None or o.num_running is not None
    if tpot is None and not load_known:
        return _Want(None, NO_DATA, "no TPOT samples and no decode load metrics")
    if tpot is not None and tpot >= c.down_threshold * slo:
        return _Want(current, WITHIN_SLO, f"TPOT p90 {tpot * 1000:.1f}ms within SLO {slo * 1000:.1f}ms")
    lat = "no TPOT samples (idle)" if tpot is None else (
        f"TPOT p90 {tpot * 1000:.1f}ms < {c.down_threshold:.0%} of SLO {slo * 1000:.1f}ms")
    if current <= 0:
        return _Want(current, WITHIN_SLO, lat)
    if waiting is not None and waiting > 0:
        return _Want(current, WITHIN_SLO, f"{lat} but {waiting:.0f} requests waiting")
    if kv is not None:
        used = kv * ready           # replica-equivalents of KV cache in use
        target = _ceil(used / c.kv_low) if used > 0 else 0
        if target == 0 and o.num_running:
            target = 1
        if target >= current:
            return _Want(current, WITHIN_SLO, f"{lat} but KV cache would be over {c.kv_low:.0%} used on "
                         f"{current - 1} replicas")
        return _Want(target, BELOW_SLO_SCALE_DOWN, f"{lat}; KV cache {kv:.0%} used fits on {target} replicas")
    if o.num_running is not None and o.num_running == 0 and tpot is None:
        return _Want(current - 1, BELOW_SLO_SCALE_DOWN, f"{lat}, nothing running")
    return _Want(current, WITHIN_SLO, f"{lat}; no KV-cache metric to size a scale-down")


def _decide_role(role: str, o: RoleObservation, c: PolicyConfig, h: RoleHistory, now: float,
                 fallback_current: int, obs_window: float) -> tuple[RoleDecision, RoleHistory, _Want]:
    b = c.bounds(role)
    current = o.current_replicas if o.current_replicas is not None else fallback_current
    ready = o.ready_replicas if o.ready_replicas is not None else current
    keep = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s) + c.interval_s
    recs = tuple(r for r in h.recommendations if now - r.time_s <= keep)
    h = replace(h, recommendations=recs)
    if o.current_replicas is None:
        return (RoleDecision(role, current, current, NO_DATA, f"{role}: current replica count unknown; holding"),
                h, _Want(None, NO_DATA, ""))
    if h.started_s is None:
        h = replace(h, started_s=now)
    want = (_prefill_want if role == "prefill" else _decode_want)(o, c, current, ready)
    if want.replicas is None:
        return RoleDecision(role, current, current, NO_DATA, f"{role}: {want.message}; holding"), h, want

    if ready < current:
        h = replace(h, last_unready_s=now)
    # warm-up: replicas starting, a recent scale-up, or a latency window that still covers the time before the
    # new replicas were ready
    warming = ready < current or (
        h.last_scale_up_time_s is not None and now - h.last_scale_up_time_s < c.warmup_s) or (
        h.last_unready_s is not None and now - h.last_unready_s < obs_window)
    raw = want.replicas
    reason, msg = want.reason, want.message
    if warming and raw < current:
        raw, reason = current, WARMING_UP
        msg = f"{want.message}; no scale-down while warming up ({ready}/{current} ready)"
    elif warming and raw > current and want.latency_driven:
        raw, reason = current, WARMING_UP
        msg = f"{want.message}; holding while new capacity warms up ({ready}/{current} ready)"
    clamped = min(max(raw, b.min_replicas), b.max_replicas)
    recs = recs + (Recommendation(now, clamped),)
    h = replace(h, recommendations=recs)

    # HPA-style stabilization: up to the min over the up window, down to the max over the down window.
    up_rec = min(r.replicas for r in recs if now - r.time_s <= c.scale_up_stabilization_s)
    down_rec = max(r.replicas for r in recs if now - r.time_s <= c.scale_down_stabilization_s)
    desired = current
    desired = max(desired, up_rec)
    desired = min(desired, down_rec)
    if desired < current and now - h.started_s < c.scale_down_stabilization_s:
        # a fresh autoscaler (or one whose history was lost) watches a whole scale-down window first
        desired = current
    if reason != WARMING_UP and (
            (clamped > current and desired < clamped) or (clamped < current and desired > clamped)):
        reason = STABILIZING
        msg = f"{want.message}; stabilizing at {desired} (window recommendations {up_rec}..{down_rec})"
    # rate limits
    up_limit = current + max(c.max_up_pods, _ceil(current * c.max_up_percent))
    down_limit = current - c.max_down_pods
    if desired > up_limit:
        desired = up_limit
        msg = f"{msg}; step limited to +{up_limit - current}"
    if desired < down_limit:
        desired = down_limit
        msg = f"{msg}; step limited to -{current - down_limit}"
    desired = min(max(desired, b.min_replicas), b.max_replicas)
    if raw > b.max_replicas and desired == b.max_replicas:
        reason = AT_MAX
        msg = f"{want.message}; wants {raw} but maxReplicas is {b.max_replicas}"
    elif raw < b.min_replicas and desired == b.min_replicas and desired == current:
        reason = AT_MIN
        msg = f"{want.message}; at minReplicas {b.min_replicas}"
    return RoleDecision(role, current, desired, reason, f"{role}: {msg}"), h, want


def decide(obs: Observations, config: PolicyConfig, history: History | None = None
           ) -> tuple[dict[str, RoleDecision], History]:
    """One evaluation: the desired replicas for both roles and the updated history. Assumes the caller applies
    the decisions (the history records a scale event whenever desired != current)."""
    history = history or History()
    now = obs.now_s
    decisions: dict[str, RoleDecision] = {}
    hists: dict[str, RoleHistory] = {}
    for role in ROLES:
        fallback = max(config.bounds(role).min_replicas, 0)
        d, h, _ = _decide_role(role, obs.role(role), config, history.role(role), now, fallback,
                               obs.window_s)
        decisions[role] = d
        hists[role] = h
    decisions = _ratio_bound(decisions, config)
    for role in ROLES:
        d, h = decisions[role], hists[role]
        if d.desired != d.current:
            h = replace(h, last_scale_time_s=now, last_scale_reason=d.reason,
                        last_scale_up_time_s=now if d.desired > d.current else h.last_scale_up_time_s)
        hists[role] = h
    return decisions, History(**hists)


def _ratio_bound(decisions: dict[str, RoleDecision], c: PolicyConfig) -> dict[str, RoleDecision]:
    """Keep prefill/decode within [min_ratio, max_ratio]: undo the part of a move that breaks the bound (never
    beyond where the role already is, so an already-out-of-bound fleet is not made worse and not forced)."""
    p, d = decisions["prefill"], decisions["decode"]
    out = dict(decisions)

    def ratio(np: int, nd: int) -> float:
        return math.inf if nd == 0 else np / nd

    if ratio(p.desired, d.desired) > c.max_ratio:
        # too much prefill: first cap a prefill scale-up, then stop a decode scale-down.
        if p.desired > p.current:
            cap = max(p.current, math.floor(c.max_ratio * d.desired))
            if cap < p.desired:
                out["prefill"] = replace(p, desired=cap, reason=RATIO_BOUND,
                                         message=f"{p.message}; capped at {cap} by prefill:decode <= {c.max_ratio:g}")
        p = out["prefill"]
        if ratio(p.desired, d.desired) > c.max_ratio and d.desired < d.current:
            floor_ = min(d.current, _ceil(p.desired / c.max_ratio))
            if floor_ > d.desired:
                out["decode"] = replace(d, desired=floor_, reason=RATIO_BOUND,
                                        message=f"{d.message}; kept at {floor_} by prefill:decode <= {c.max_ratio:g}")
    elif ratio(p.desired, d.desired) < c.min_ratio:
        if d.desired > d.current:
            cap = max(d.current, math.floor(p.desired / c.min_ratio))
            if cap < d.desired:
                out["decode"] = replace(d, desired=cap, reason=RATIO_BOUND,
                                        message=f"{d.message}; capped at {cap} by prefill:decode >= {c.min_ratio:g}")
        d = out["decode"]
        if ratio(p.desired, d.desired) < c.min_ratio and p.desired < p.current:
            floor_ = min(p.current, _ceil(d.desired * c.min_ratio))
            if floor_ > p.desired:
                out["prefill"] = replace(p, desired=floor_, reason=RATIO_BOUND,
                                         message=f"{p.message}; kept at {floor_} by prefill:decode >= {c.min_ratio:g}")
    return out
