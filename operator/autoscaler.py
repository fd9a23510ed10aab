"""The SLO autoscaler loop: Prometheus + Deployments -> `autoscale_policy.decide` -> replicas, status, Events.

One loop per LLMService where Baton autoscales a role (autoscaling mode `baton`: `spec.<role>.autoscaling.mode`,
else `spec.autoscaling.mode`, else `spec.autoscaling.enabled`; one of the operator's own loops (`service_loops`,
started in handlers.py), stopped when no role is left in mode baton or the object goes away). A role in mode `external` (HPA, KEDA,
`kubectl scale`) or `off` is never scaled, recorded as pending, or reported in desiredReplicas by this loop
(`PolicyConfig.managed`). Every `spec.autoscaling.interval`:

1. Read the SLO signals and per-role load from Prometheus (`prometheus.PrometheusSource`, outside any lock:
   a slow Prometheus must not hold up reconciles).
2. Under the Reconciler's per-LLMService lock (the one reconciles hold, so neither overwrites the other's
   status): read the prefill/decode Deployments (replicas, ready replicas), run the pure policy, apply each
   changed role's replicas by server-side apply of `{spec: {replicas}}` as field manager `baton-autoscaler`
   (the manager that owns `spec.replicas` while autoscaling is on; see reconcile._hand_replicas_to_autoscaler),
   and merge-patch the status: `prefill/decode.desiredReplicas`, `lastScaleTime`, `lastScaleReason`,
   `slo {ttftP90, tpotP90, attainment, window}` and the `SLOMet` condition (reconcile keeps conditions it
   does not own).
3. Post an Event per scale action (reason `ScaledUp`/`ScaledDown`, with the numbers and the policy's reason),
   and export `baton_autoscaler_desired_replicas` / `baton_autoscaler_decisions_total`.

When Prometheus cannot be reached (or refuses a query) the replicas are held, `SLOMet` becomes Unknown with
reason `PrometheusUnreachable` (or `PrometheusQueryFailed`), and one Warning Event is posted per transition
(and a Normal `PrometheusReachable` when it comes back), not one per tick.

The policy's `History` (stabilization windows, warm-up, last scale times) lives in the LLMService's memo (service_loops) and
is persisted in `status.autoscaler` (see `autoscaler_store` for why status, and why wall-clock times), so an
operator restart neither starts the windows over nor scales down early:

- Every tick whose history changed writes it (one status merge patch, together with `slo` and conditions).
- A tick that scales writes the new history and the actions (`status.autoscaler.pending`) *before* applying
  any replicas (write-ahead): if that write fails, nothing is scaled; if the operator dies after it, the next
  one completes the recorded actions whose Deployments have not moved (`autoscaler_store.unfinished`). The
  pending record is cleared with the tick's final status patch.
- On start (the memo empty: a new process), the first tick loads the persisted history before deciding.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from baton.operator import api
from baton.operator import autoscaler_store as store
from baton.operator.autoscale_policy import (
    ROLES,
    History,
    Observations,
    PolicyConfig,
    RoleDecision,
    RoleObservation,
    decide,
)
from baton.operator.kube import AUTOSCALER_FIELD_MANAGER, GROUP, VERSION, Kube, KubeError
from baton.operator.naming import role_name
from baton.operator.planner.overlay import effective
from baton.operator.prometheus import (
    FIRST_DECODE,
    KV_HANDOFF,
    PREFILL_COMPUTE,
    PREFILL_QUEUE,
    PrometheusClient,
    PrometheusError,
    PrometheusSource,
    PrometheusUnavailable,
    RoleLoad,
    ServiceMetrics,
)
from baton.operator.reconcile import now_rfc3339
from baton.operator.status import set_condition
from baton.operator.units import format_duration
from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger("baton.operator.autoscaler")

SLO_MET = api.ConditionType.SLO_MET
PROMETHEUS_UNREACHABLE = "PrometheusUnreachable"
PROMETHEUS_QUERY_FAILED = "PrometheusQueryFailed"
#: Shortest rate() window when none is configured: a few scrapes at the usual 15-30s scrape intervals.
MIN_AUTO_WINDOW_S = 60.0

#: Called for each action worth a Kubernetes Event: (event type "Normal"/"Warning", reason, message).
EventSink = Callable[[str, str, str], None]


# ------------------------------------------------------------------------------------------ options, metrics


@dataclass
class Options:
    """Process-wide settings from `baton operator run` (set before kopf starts)."""

    metrics_port: int = 8080  # 0: no metrics endpoint
    metrics_listen: str = "0.0.0.0"
    window_s: float | None = None  # rate() window; None: max(4 x interval, MIN_AUTO_WINDOW_S)
    prometheus_timeout_s: float = 5.0


OPTIONS = Options()

DESIRED_REPLICAS = Gauge("baton_autoscaler_desired_replicas",
                         "Replicas the autoscaler wants for a role of an LLMService.",
                         ["llmservice", "namespace", "role"])
DECISIONS = Counter("baton_autoscaler_decisions",
                    "Autoscaler evaluations per role, by the policy's reason (e.g. TTFTAboveSLO, WithinSLO).",
                    ["llmservice", "namespace", "role", "reason"])
PROMETHEUS_UP = Gauge("baton_autoscaler_prometheus_up",
                      "1 when the autoscaler's last Prometheus query for this LLMService succeeded, else 0.",
                      ["llmservice", "namespace"])
MAX_REPLICAS = Gauge("baton_autoscaler_max_replicas",
                     "A role's autoscaling.maxReplicas (so 'stuck at max' is visible next to desired replicas).",
                     ["llmservice", "namespace", "role"])
_metrics_server: Any = None


def serve_metrics() -> bool:
    """Start the operator's /metrics endpoint (prometheus_client, default registry); idempotent.

    A busy port is logged, not fatal: the operator's job is reconciling, metrics are secondary.
    """
    global _metrics_server
    if _metrics_server is not None or not OPTIONS.metrics_port:
        return _metrics_server is not None
    try:
        _metrics_server, _ = start_http_server(OPTIONS.metrics_port, addr=OPTIONS.metrics_listen)
    except OSError as exc:
        log.error("cannot serve operator metrics on %s:%s: %s", OPTIONS.metrics_listen, OPTIONS.metrics_port, exc)
        return False
    log.info("operator metrics on http://%s:%s/metrics", OPTIONS.metrics_listen, OPTIONS.metrics_port)
    return True


def stop_metrics() -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server.server_close()
        _metrics_server = None


def forget_role_metrics(namespace: str, name: str, role: str) -> None:
    """Drop one role's gauge series (a role Baton does not scale, or no longer)."""
    for gauge in (DESIRED_REPLICAS, MAX_REPLICAS):
        try:
            gauge.remove(name, namespace, role)
        except KeyError:
            pass


def forget_metrics(namespace: str, name: str) -> None:
    """Drop a service's gauge series (autoscaling off, or the LLMService deleted)."""
    for role in ROLES:
        forget_role_metrics(namespace, name, role)
    try:
        PROMETHEUS_UP.remove(name, namespace)
    except KeyError:
        pass


def window_for(interval_s: float) -> float:
    return OPTIONS.window_s or max(4 * interval_s, MIN_AUTO_WINDOW_S)


# ------------------------------------------------------------------------------------------ pure parts


#: Busy seconds per second (summed over the prefill pods) below which the capacity estimate is mostly noise: a
#: few short prompts in the window say little about what a replica computes when it is kept busy.
MIN_BUSY_FOR_CAPACITY = 0.05


def prefill_capacity(load: RoleLoad | None) -> float | None:
    """Prompt tokens one prefill replica computes per second while busy: the role's prompt-token rate over its
    busy seconds per second (both summed over its pods, over the same window), as the simulator measures it.
    None without busy data (vLLM workers) or with too little of it (`MIN_BUSY_FOR_CAPACITY`)."""
    if load is None or not load.prompt_tokens_per_second or load.busy_seconds_per_second is None:
        return None
    if load.busy_seconds_per_second < MIN_BUSY_FOR_CAPACITY:
        return None
    return load.prompt_tokens_per_second / load.busy_seconds_per_second


def role_observations(metrics: ServiceMetrics, deployments: dict[str, dict | None], now_s: float
                      ) -> Observations:
    """The policy's inputs: Prometheus' numbers plus each Deployment's replicas and ready replicas.

    Prefill: TTFT p90 (and its router stages: prefill scales on queue wait + compute when they exist), queue
    (requests waiting), prompt-token arrival rate, running. Decode: TPOT p90,
    KV-cache usage, running, waiting. A missing Deployment gives `current_replicas` None (the policy holds).
    Prefill's per-replica capacity (`prefill_tokens_per_s`, `prefill_capacity`) and both roles' busy share come
    from the Baton workers' busy-time counter; vLLM workers export none, and then the policy's capacity-based
    prefill rules (load, backlog sizing, arrival forecast, burst band) stay off and TTFT drives prefill.
    """
    def replicas(role: str) -> tuple[int | None, int | None]:
        dep = deployments.get(role)
        if dep is None:
            return None, None
        return int((dep.get("spec") or {}).get("replicas", 1)), int((dep.get("status") or {}).get("readyReplicas") or 0)

    p_load, d_load = metrics.roles.get("prefill"), metrics.roles.get("decode")
    p_cur, p_ready = replicas("prefill")
    d_cur, d_ready = replicas("decode")
    prefill = RoleObservation(
        ttft_p90_s=metrics.ttft.p90,
        num_waiting=p_load.waiting if p_load else None,
        prompt_tokens_per_s=p_load.prompt_tokens_per_second if p_load else None,
        prefill_tokens_per_s=prefill_capacity(p_load),
        busy_fraction=p_load.busy_fraction if p_load else None,
        num_running=p_load.running if p_load else None,
        current_replicas=p_cur, ready_replicas=p_ready,
        prefill_queue_p90_s=metrics.ttft_stages.get(PREFILL_QUEUE),
        prefill_compute_p90_s=metrics.ttft_stages.get(PREFILL_COMPUTE),
        kv_handoff_p90_s=metrics.ttft_stages.get(KV_HANDOFF),
        first_decode_p90_s=metrics.ttft_stages.get(FIRST_DECODE))
    decode = RoleObservation(
        tpot_p90_s=metrics.tpot.p90,
        kv_cache_usage=d_load.kv_cache_usage if d_load else None,
        num_running=d_load.running if d_load else None,
        num_waiting=d_load.waiting if d_load else None,
        busy_fraction=d_load.busy_fraction if d_load else None,
        current_replicas=d_cur, ready_replicas=d_ready)
    return Observations(prefill=prefill, decode=decode, window_s=metrics.window, now_s=now_s)


def _ms(seconds: float) -> str:
    return format_duration(round(seconds, 4))


def slo_status(metrics: ServiceMetrics | None, window_s: float) -> dict:
    """`status.slo`; unknown numbers are null (a merge patch then removes stale ones)."""
    if metrics is None:
        return {"ttftP90": None, "tpotP90": None, "attainment": None, "window": format_duration(window_s)}
    return {
        "ttftP90": _ms(metrics.ttft.p90) if metrics.ttft.p90 is not None else None,
        "tpotP90": _ms(metrics.tpot.p90) if metrics.tpot.p90 is not None else None,
        "attainment": round(metrics.attainment, 4) if metrics.attainment is not None else None,
        "window": format_duration(metrics.window),
    }


def slo_condition(metrics: ServiceMetrics | None, slo: api.SLOSpec, error: PrometheusError | None = None
                  ) -> tuple[str, str, str]:
    """(status, reason, message) of the `SLOMet` condition."""
    if error is not None:
        reason = PROMETHEUS_UNREACHABLE if isinstance(error, PrometheusUnavailable) else PROMETHEUS_QUERY_FAILED
        return "Unknown", reason, f"{error}; holding replicas"
    assert metrics is not None
    window = format_duration(metrics.window)
    if metrics.ttft.p90 is None and metrics.tpot.p90 is None:
        return "Unknown", "NoTraffic", f"no requests measured in the last {window}"
    misses, reasons = [], []
    parts = []
    for label, signal, target in (("TTFT", metrics.ttft, slo.ttft.seconds), ("TPOT", metrics.tpot, slo.tpot.seconds)):
        if signal.p90 is None:
            parts.append(f"{label} p90 unknown")
            continue
        where = "" if signal.source == "router" else f" (from the {signal.source})"
        text = f"{label} p90 {_ms(signal.p90)} {'>' if signal.p90 > target else '<='} SLO {_ms(target)}{where}"
        parts.append(text)
        if signal.p90 > target:
            misses.append(text)
            reasons.append(label)
    if metrics.attainment is not None:
        ok = metrics.attainment >= slo.attainment
        parts.append(f"attainment {metrics.attainment:.3f} {'>=' if ok else '<'} {slo.attainment:g}")
        if not ok and not reasons:
            reasons.append("Attainment")
    message = "; ".join(parts) + f" (window {window})"
    if not reasons:
        return "True", "WithinSLO", message
    if reasons == ["Attainment"]:
        return "False", "AttainmentBelowTarget", message
    return "False", f"{'And'.join(reasons)}AboveSLO", message


def _differs(patch: object, live: object) -> bool:
    """Whether applying merge patch `patch` to `live` would change it (None in `patch` deletes)."""
    if isinstance(patch, dict):
        live = live if isinstance(live, dict) else {}
        return any((live.get(k) is not None) if v is None else _differs(v, live.get(k)) for k, v in patch.items())
    return patch != live


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class AutoscalerState:
    """What one LLMService's loop remembers between ticks (kept in the LLMService's memo, service_loops)."""

    history: History = field(default_factory=History)
    prometheus_ok: bool | None = None  # last tick's Prometheus state, for once-per-transition Events
    client: PrometheusClient | None = None
    restored: bool = False  # whether status.autoscaler has been read (once per process, on the first tick)

    def source(self, url: str, window_s: float, interval_s: float) -> PrometheusSource:
        if self.client is None or self.client.url != url.rstrip("/"):
            if self.client is not None:
                asyncio.get_running_loop().create_task(self.client.aclose())
            self.client = PrometheusClient(url, timeout=max(1.0, min(OPTIONS.prometheus_timeout_s, interval_s)))
        return PrometheusSource(self.client, window_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


@dataclass
class TickResult:
    decisions: dict[str, RoleDecision] = field(default_factory=dict)
    scaled: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (from, to)
    error: str | None = None
    status_patch: dict = field(default_factory=dict)
    interval_s: float = 15.0


async def tick(kube: Kube, lock: asyncio.Lock, namespace: str, name: str, state: AutoscalerState,
               emit: EventSink, now_s: float | None = None) -> TickResult | None:
    """One evaluation (see the module docstring). None when there is nothing to autoscale."""
    llms = await asyncio.to_thread(kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name)
    if llms is None or (llms.get("metadata") or {}).get("deletionTimestamp"):
        return None
    try:
        svc = api.parse_llmservice(effective(llms))  # an applied plan's replicas are floors
    except api.InvalidLLMService as exc:
        log.warning("%s/%s: not autoscaling an invalid LLMService: %s", namespace, name, exc)
        return None
    spec = svc.spec
    config = PolicyConfig.from_spec(spec)
    if not config.managed or not spec.autoscaling.prometheus_url:
        return None
    for role in ROLES:
        if role not in config.managed:  # external/off: not this loop's (its gauges would be stale)
            forget_role_metrics(namespace, name, role)
    window_s = window_for(config.interval_s)
    result = TickResult(interval_s=config.interval_s)

    metrics: ServiceMetrics | None = None
    error: PrometheusError | None = None
    try:
        source = state.source(spec.autoscaling.prometheus_url, window_s, config.interval_s)
        metrics = await source.observe(name, namespace, spec.slo.ttft.seconds, spec.slo.tpot.seconds)
    except PrometheusError as exc:
        error = exc
        result.error = str(exc)

    if error is not None and state.prometheus_ok is not False:
        emit("Warning", PROMETHEUS_UNREACHABLE if isinstance(error, PrometheusUnavailable)
             else PROMETHEUS_QUERY_FAILED, f"{error}; holding replicas until it answers")
    elif error is None and state.prometheus_ok is False:
        emit("Normal", "PrometheusReachable", f"Prometheus at {spec.autoscaling.prometheus_url} answers again; "
             "autoscaling resumes")
    state.prometheus_ok = error is None
    PROMETHEUS_UP.labels(name, namespace).set(1 if error is None else 0)
    for role in config.managed:
        MAX_REPLICAS.labels(name, namespace, role).set(getattr(config, role).max_replicas)

    async with lock:
        deployments = {}
        for role in ROLES:
            deployments[role] = await asyncio.to_thread(kube.get, "apps/v1", "Deployment", namespace,
                                                        role_name(name, role))
        # Wall clock, not monotonic: the history is persisted and read back by the next process (autoscaler_store).
        now = time.time() if now_s is None else now_s
        if not state.restored:
            await _restore(kube, llms, deployments, state, namespace, name, emit, now, window_s, config.managed)
        previous = state.history
        if metrics is not None:
            decisions, state.history = decide(role_observations(metrics, deployments, now), config, previous)
        else:
            decisions = {}
            for role in ROLES:
                current = int(((deployments.get(role) or {}).get("spec") or {}).get("replicas", 0))
                reason = PROMETHEUS_UNREACHABLE if isinstance(error, PrometheusUnavailable) else PROMETHEUS_QUERY_FAILED
                decisions[role] = RoleDecision(role, current, current, reason, f"{role}: holding: {error}")
        # Only the roles in mode baton: the others' replicas belong to someone else (or to the spec).
        decisions = {role: d for role, d in decisions.items() if role in config.managed}
        result.decisions = decisions

        stamp = now_rfc3339()
        acting = {role: d for role, d in decisions.items() if d.changed and deployments.get(role) is not None}
        held: set[str] = set()
        if acting:  # write-ahead: the history that records the actions, and the actions, before acting
            saved = ((llms.get("status") or {}).get("autoscaler"))
            try:
                await asyncio.to_thread(kube.patch_llmservice_status, namespace, name, {"autoscaler": store.status_patch(
                    state.history, saved, store.pending_actions(acting, now))})
            except KubeError as exc:
                state.history = dataclasses.replace(state.history, **{r: previous.role(r) for r in acting})
                for role, d in acting.items():
                    emit("Warning", "ScaleFailed", f"not scaling {role} {d.current} -> {d.desired}: recording the "
                         f"decision in status failed: {exc}")
                held, acting = set(acting), {}
        role_status: dict[str, dict] = {}
        for role, d in decisions.items():
            entry: dict = {"desiredReplicas": d.current if role in held else d.desired}
            if role in acting:
                try:
                    await asyncio.to_thread(kube.apply, {
                        "apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": role_name(name, role), "namespace": namespace},
                        "spec": {"replicas": d.desired}}, field_manager=AUTOSCALER_FIELD_MANAGER)
                except KubeError as exc:
                    # Not applied: forget that the policy scaled, so warm-up/stabilization do not count it.
                    state.history = dataclasses.replace(state.history, **{role: previous.role(role)})
                    emit("Warning", "ScaleFailed", f"scaling {role} {d.current} -> {d.desired} failed: {exc}")
                    entry["desiredReplicas"] = d.current
                else:
                    result.scaled[role] = (d.current, d.desired)
                    entry.update(lastScaleTime=stamp, lastScaleReason=d.reason)
                    emit("Normal", "ScaledUp" if d.desired > d.current else "ScaledDown",
                         f"{role} {d.current} -> {d.desired} replicas: {d.reason}: {d.message}")
            role_status[role] = entry
            DESIRED_REPLICAS.labels(name, namespace, role).set(entry["desiredReplicas"])
            DECISIONS.labels(name, namespace, role, d.reason).inc()

        # Status: read again under the lock (a reconcile may have written since the read above).
        fresh = await asyncio.to_thread(kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name) or llms
        current_status = fresh.get("status") or {}
        generation = int((fresh.get("metadata") or {}).get("generation") or 0)
        cond_status, reason, message = slo_condition(metrics, spec.slo, error)
        conditions = set_condition(list(current_status.get("conditions") or []), SLO_MET, cond_status, reason,
                                   message, stamp, generation)
        patch: dict = {"slo": slo_status(metrics, window_s), **role_status,
                       "autoscaler": store.status_patch(state.history, current_status.get("autoscaler"))}
        patch = {key: value for key, value in patch.items() if _differs({key: value}, current_status)}
        if conditions != (current_status.get("conditions") or []):
            patch["conditions"] = conditions
        if patch:  # only what changed: in a steady state that is the history's newest recommendation
            try:
                await asyncio.to_thread(kube.patch_llmservice_status, namespace, name, patch)
            except KubeError as exc:
                log.warning("%s/%s: writing autoscaler status failed: %s", namespace, name, exc)
        result.status_patch = patch
    return result


async def _restore(kube: Kube, llms: dict, deployments: dict[str, dict | None], state: AutoscalerState,
                   namespace: str, name: str, emit: EventSink, now: float, max_age_s: float,
                   managed: tuple[str, ...] = ROLES) -> None:
    """First tick of this process: load the persisted history (unless the memo already holds one) and complete
    the scale actions a killed predecessor recorded but may not have applied -- for the roles still in mode
    baton only (a role handed to an outside autoscaler since is not touched). Updates `deployments`."""
    state.restored = True
    history, pending = store.restore((llms.get("status") or {}).get("autoscaler"))
    if state.history == History() and history != History():
        state.history = history
        log.info("%s/%s: autoscaler history restored from status.autoscaler", namespace, name)
    replicas = {role: int((dep.get("spec") or {}).get("replicas", 1)) if dep else None
                for role, dep in deployments.items()}
    for role, (start, target, reason) in store.unfinished(pending, replicas, now, max_age_s).items():
        if role not in managed:
            continue
        try:
            deployments[role] = await asyncio.to_thread(kube.apply, {
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": role_name(name, role), "namespace": namespace},
                "spec": {"replicas": target}}, field_manager=AUTOSCALER_FIELD_MANAGER)
        except KubeError as exc:  # the next evaluation starts from the replicas as they are
            log.warning("%s/%s: completing the recorded scale of %s failed: %s", namespace, name, role, exc)
            continue
        emit("Normal", "ScaledUp" if target > start else "ScaledDown",
             f"{role} {start} -> {target} replicas: {reason}: completing the decision recorded before the "
             "operator restarted")


def memo_state(memo: Any) -> AutoscalerState:
    state = memo.get("autoscaler") if hasattr(memo, "get") else None
    if state is None:
        state = AutoscalerState()
        memo["autoscaler"] = state
    return state


async def run(kube: Kube, lock_for: Callable[[], asyncio.Lock], namespace: str, name: str, memo: Any,
              stopped: Any, emit: EventSink) -> None:
    """The loop of one LLMService, until `stopped` (a `service_loops.StopFlag`) is set."""
    state = memo_state(memo)
    log.info("%s/%s: autoscaler started", namespace, name)
    try:
        while not stopped:
            interval = 15.0
            try:
                result = await tick(kube, lock_for(), namespace, name, state, emit)
                if result is not None:
                    interval = result.interval_s
                    if result.error:  # the transition was logged and posted as an Event by `tick`
                        log.debug("%s/%s: %s", namespace, name, result.error)
            except Exception:  # one bad tick must not end the loop
                log.exception("%s/%s: autoscaler tick failed", namespace, name)
            await stopped.wait(interval)
    finally:
        await state.close()
        forget_metrics(namespace, name)
        log.info("%s/%s: autoscaler stopped", namespace, name)

