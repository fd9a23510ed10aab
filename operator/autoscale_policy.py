"""The SLO autoscaling policy: pure functions from observations to replica decisions (no I/O, no clock).

Prefill is scaled on its own part of TTFT (the router's prefill queue wait + compute p90 against prefill's share
of the TTFT budget; the whole TTFT p90 when the router reports no stages) and on its prompt backlog; decode on
TPOT (p90) and on KV-cache pressure; both also on where the prompt-token arrival rate is heading (Holt's
forecast, operator/autoscale_forecast.py). `decide` is called every `interval` by the autoscaler timer
(operator/autoscaler.py) and by the simulator (operator/simulate.py), with the `History` it returned last time.

First, the arrival model in the history folds in the measured prompt-token rate (once per evaluation, both roles
read it). Then per role (the rules are in operator/autoscale_rules.py):

1. **Raw recommendation** (what the signals ask for, clamped to min/max):
   - prefill up: with TTFT stages, (queue + compute p90) > `up_threshold` × budget, where budget = SLO - hand-off
     and first-decode p90s but at least `min_prefill_ttft_share` × SLO -> `ceil(ready × ratio)`
     (`PrefillAboveBudget`; hand-off and first decode are not prefill's to fix); without stages TTFT p90 >
     `up_threshold`×SLO -> `ceil(ready × p90/SLO)` (`TTFTAboveSLO`); queued prompt tokens
     that the role cannot drain within `backlog_fraction`×TTFT-SLO at its measured throughput ->
     `ceil(queue / (tokens_per_s × backlog_fraction × SLO))` (`QueueBacklog`); incoming prompt-token rate above
     `target_utilisation` of capacity -> `ceil(rate / (tokens_per_s × target))` (`LoadAboveCapacity`); the
     arrival forecast `window/2 + forecast_lead_s` ahead above the rate -> the same sizing for the forecast
     (`ArrivalRateRising`: scale before the burst's peak reaches the measured rate).
   - decode up: TPOT p90 > `up_threshold`×SLO -> `ceil(ready × p90/SLO)` (`TPOTAboveSLO`); KV-cache usage >
     `kv_high` or requests waiting for KV -> `ceil(ready × usage / kv_target)` (`KVCachePressure`); arrivals
     rising (forecast/rate = g > 1) -> `ceil(ready × usage × g / kv_target)` (`ArrivalRateRising`).
   - down (both): only when latency is < `down_threshold`×SLO (hysteresis band: between the two thresholds the
     recommendation is "hold") *and* utilisation is low: the load would still fit comfortably on one replica
     less (`BelowSLOScaleDown`), where the load is sized for the arrival band `mean + headroom_k × MAD` over
     `headroom_memory_s` (traffic that has come in bursts keeps the capacity for them; steady traffic's band
     is its mean). Idle roles (no latency samples because no traffic, but load metrics that say zero) may scale
     down too; missing metrics never count as zero.
   - no usable signal at all -> hold (`NoData`), and nothing is recorded.
2. **Warm-up and the pending-scale guard**: while a role has not-ready replicas or scaled up less than
   `warmup_s` ago, it does not scale down, and latency-driven scale-up is held (capacity is already on its way
   and the latency window is stale). Load-driven scale-up (backlog, KV, rate), which counts replicas rather
   than reading latency, still applies, but while replicas of the last scale-up are still starting only if it
   asks for more than that scale-up did *and* arrivals rose by more than `pending_tolerance` since (a backlog
   that grows only because the capacity is not there yet must not be counted twice). Latency that is high only
   because of a backlog that has drained since (the window still holds requests that queued before the
   capacity came, and the load fits the ready replicas) does not scale up either.
3. **Stabilization** (as the HPA's behavior): the recommendation is recorded; the role scales up to the *lowest*
   recommendation over the scale-up window and down to the *highest* over the scale-down window. Alternating
   high/low latency therefore ratchets up at most and never oscillates.
4. **Rate limits**: up by at most `max(max_up_pods, ceil(current × max_up_percent))`, down by `max_down_pods`.
5. **Ratio bound**: prefill:decode replicas stays within [`min_ratio`, `max_ratio`]: a role is not allowed to
   move in the direction that breaks the bound, so the two loops cannot fight each other.

Only the roles in `PolicyConfig.managed` are scaled (the roles whose autoscaling mode is `baton`): another role
(mode `external`: HPA, KEDA, `kubectl scale`; or `off`) gets a decision that holds it at its current replicas
(`NotManaged`), and its history is dropped, so a role handed back to Baton starts afresh (a whole scale-down
window watched first). Its replicas still count in the ratio bound of the managed role.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from baton.operator.autoscale_forecast import ArrivalModel
from baton.operator.autoscale_rules import (
    AT_MAX,
    AT_MIN,
    NO_DATA,
    NOT_MANAGED,
    RATIO_BOUND,
    STABILIZING,
    WARMING_UP,
    WITHIN_SLO,
    Arrivals,
    Want,
    backlog_now,
    ceil_up,
    decode_want,
    fits_ready,
    prefill_want,
)

if TYPE_CHECKING:
    from baton.operator.api import LLMServiceSpec

ROLES: tuple[str, str] = ("prefill", "decode")

# Reasons (CamelCase, as Kubernetes condition reasons).


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
    #: decode only: output tokens produced per second over the window (summed over the role's pods)
    generation_tokens_per_s: float | None = None
    current_replicas: int | None = None
    ready_replicas: int | None = None
    #: prefill only: p90 of the router's TTFT stages (`Metric.ROUTER_TTFT_STAGE`). Queue wait and compute are
    #: prefill's to fix; KV hand-off and first decode are not, and shrink prefill's share of the TTFT budget.
    prefill_queue_p90_s: float | None = None
    prefill_compute_p90_s: float | None = None
    kv_handoff_p90_s: float | None = None
    first_decode_p90_s: float | None = None


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
    #: the roles this policy scales (autoscaling mode baton); the others are held where they are
    managed: tuple[str, ...] = ROLES
    #: prefill:decode replica ratio bounds
    min_ratio: float = 0.125
    max_ratio: float = 8.0
    #: with TTFT stage data, prefill's budget is the SLO minus the hand-off and first-decode p90s, at least this
    #: share of the SLO (what the other stages take beyond that is not prefill's to fix)
    min_prefill_ttft_share: float = 0.5
    #: arrival-rate forecast (Holt): smoothing of level and trend; it looks window/2 + forecast_lead_s ahead
    forecast_alpha: float = 0.7
    forecast_beta: float = 0.5
    forecast_lead_s: float = 15.0
    #: scale-down keeps capacity for the band mean + headroom_k x MAD of the arrival rate (memory headroom_memory_s)
    headroom_k: float = 2.0
    headroom_memory_s: float = 1800.0
    #: pending-scale guard: a scale-up stacks on one still starting only if arrivals rose by more than this
    pending_tolerance: float = 0.1

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
            "managed": tuple(r for r in ROLES if spec.autoscaling_mode(r) == "baton"),
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
    #: what the last scale-up asked for (before step limits): while its replicas start, another scale-up needs
    #: a signal that asks for more (the pending-scale guard)
    pending_target: int | None = None
    #: the arrival signal (prompt tokens/s, forecast or measured, the higher) when that scale-up was decided
    pending_signal: float | None = None
    #: last evaluation that saw requests waiting (decode: for KV); latency until a window later includes waits
    last_backlog_s: float | None = None


@dataclass(frozen=True)
class History:
    """What `decide` remembers between evaluations; returned updated, never mutated. `to_dict`/`from_dict` make
    it storable (e.g. in the LLMService status) so an operator restart keeps its stabilization windows."""

    prefill: RoleHistory = field(default_factory=RoleHistory)
    decode: RoleHistory = field(default_factory=RoleHistory)
    #: the prompt-token arrival rate's forecast and band (operator/autoscale_forecast.py)
    arrivals: ArrivalModel = field(default_factory=ArrivalModel)

    def role(self, name: str) -> RoleHistory:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            r: {"recommendations": [[x.time_s, x.replicas] for x in self.role(r).recommendations],
                "lastScaleTime": self.role(r).last_scale_time_s,
                "lastScaleUpTime": self.role(r).last_scale_up_time_s,
                "lastScaleReason": self.role(r).last_scale_reason,
                "started": self.role(r).started_s,
                "lastUnready": self.role(r).last_unready_s,
                "pendingTarget": self.role(r).pending_target,
                "pendingSignal": self.role(r).pending_signal,
                "lastBacklog": self.role(r).last_backlog_s} for r in ROLES}
        out["arrivals"] = self.arrivals.to_dict()
        return out

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
                pending_target=d.get("pendingTarget"),
                pending_signal=d.get("pendingSignal"),
                last_backlog_s=d.get("lastBacklog"),
            )
        return cls(**roles, arrivals=ArrivalModel.from_dict(data.get("arrivals")))


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


def _worse(h: RoleHistory, raw: int, a: Arrivals, c: PolicyConfig) -> bool:
    """Whether a scale-up may stack on a pending one: it asks for more replicas than the pending one did and,
    where arrivals are measured, they rose by more than `pending_tolerance` since it was decided."""
    if h.pending_target is not None and raw <= h.pending_target:
        return False
    now, then = a.signal(), h.pending_signal
    return now is None or then is None or now > then * (1 + c.pending_tolerance)


def _decide_role(role: str, o: RoleObservation, c: PolicyConfig, h: RoleHistory, now: float,
                 fallback_current: int, obs_window: float, arrivals: Arrivals
                 ) -> tuple[RoleDecision, RoleHistory, Want]:
    b = c.bounds(role)
    current = o.current_replicas if o.current_replicas is not None else fallback_current
    ready = o.ready_replicas if o.ready_replicas is not None else current
    keep = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s) + c.interval_s
    recs = tuple(r for r in h.recommendations if now - r.time_s <= keep)
    h = replace(h, recommendations=recs)
    if o.current_replicas is None:
        return (RoleDecision(role, current, current, NO_DATA, f"{role}: current replica count unknown; holding"),
                h, Want(None, NO_DATA, ""))
    if h.started_s is None:
        h = replace(h, started_s=now)
    want = (prefill_want if role == "prefill" else decode_want)(o, c, current, ready, arrivals)
    if want.replicas is None:
        return RoleDecision(role, current, current, NO_DATA, f"{role}: {want.message}; holding"), h, want

    backlog = backlog_now(role, o, c, ready)
    if backlog:
        h = replace(h, last_backlog_s=now)
    starting = ready < current
    if starting:
        h = replace(h, last_unready_s=now)
    else:
        h = replace(h, pending_target=None, pending_signal=None)
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
    elif (raw > current and want.latency_driven and backlog is False and h.last_backlog_s is not None
          and now - h.last_backlog_s < obs_window + c.interval_s and fits_ready(role, o, c, ready, arrivals)):
        # latency is a window behind: the backlog has drained and the load fits the ready replicas, so the high
        # p90 is about requests that queued before (scaling on it would overshoot)
        raw, reason = current, WITHIN_SLO
        msg = f"{want.message}, but from requests queued until {now - h.last_backlog_s:.0f}s ago; backlog drained"
    elif starting and raw > current and h.pending_target is not None and not _worse(h, raw, arrivals, c):
        # pending-scale guard: the last scale-up's replicas are still starting and the signal is not worse
        # than it was then (a backlog growing until they serve would count the same missing capacity twice)
        raw, reason = current, WARMING_UP
        msg = (f"{want.message}; {current - ready} replicas of the scale-up to {h.pending_target} still "
               "starting and the load is not worse than when it was decided")
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
    up_limit = current + max(c.max_up_pods, ceil_up(current * c.max_up_percent))
    down_limit = current - c.max_down_pods
    if desired > up_limit:
        desired = up_limit
        msg = f"{msg}; step limited to +{up_limit - current}"
    if desired < down_limit:
        desired = down_limit
        msg = f"{msg}; step limited to -{current - down_limit}"
    desired = min(max(desired, b.min_replicas), b.max_replicas)
    if desired > current:
        h = replace(h, pending_target=max(clamped, desired), pending_signal=arrivals.signal())
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
    model = history.arrivals
    rate = obs.prefill.prompt_tokens_per_s
    if rate is not None:
        model = model.update(rate, now, config.forecast_alpha, config.forecast_beta, config.headroom_memory_s,
                             reset_after_s=max(4 * config.interval_s, obs.window_s))
    horizon = obs.window_s / 2 + config.forecast_lead_s
    arrivals = Arrivals(model.forecast(horizon), model.band(config.headroom_k), horizon, rate) \
        if rate is not None else Arrivals()
    decisions: dict[str, RoleDecision] = {}
    hists: dict[str, RoleHistory] = {}
    for role in ROLES:
        fallback = max(config.bounds(role).min_replicas, 0)
        if role not in config.managed:
            current = obs.role(role).current_replicas
            current = fallback if current is None else current
            decisions[role] = RoleDecision(role, current, current, NOT_MANAGED,
                                           f"{role}: not scaled by Baton (its autoscaling mode is not baton)")
            hists[role] = RoleHistory()
            continue
        d, h, _ = _decide_role(role, obs.role(role), config, history.role(role), now, fallback,
                               obs.window_s, arrivals)
        decisions[role] = d
        hists[role] = h
    decisions = _ratio_bound(decisions, config)
    for role in ROLES:
        d, h = decisions[role], hists[role]
        if d.desired != d.current:
            h = replace(h, last_scale_time_s=now, last_scale_reason=d.reason,
                        last_scale_up_time_s=now if d.desired > d.current else h.last_scale_up_time_s)
        hists[role] = h
    return decisions, History(**hists, arrivals=model)


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
            floor_ = min(d.current, ceil_up(p.desired / c.max_ratio))
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
            floor_ = min(p.current, ceil_up(d.desired * c.min_ratio))
            if floor_ > p.desired:
                out["prefill"] = replace(p, desired=floor_, reason=RATIO_BOUND,
                                         message=f"{p.message}; kept at {floor_} by prefill:decode >= {c.min_ratio:g}")
    return out
