"""A trace-driven, discrete-event simulator of a disaggregated prefill/decode fleet under an autoscaler.

Simulated time only (no sleeps, no I/O besides loading a profile or trace): a 1-hour trace runs in seconds.

Workers are latency curves (`baton.profile.WorkerProfile`: the DistServe model of prefill batch time and decode
step time, from the built-in A100 fits or a profile `baton profile` measured). Requests and percentiles are the
shared workload model's (`baton.workload`), so simulated and measured numbers are computed alike.

Serving approximations (documented so results are read for what they are):
- Prefill: one FIFO queue in front of the ready prefill replicas (an ideal least-loaded router); an idle replica
  takes a batch from the head of the queue up to `max_batch_tokens` (at least one request). The first token
  is produced at the end of the batch: TTFT = batch end - arrival (KV transfer `kv_transfer_s` is added to the
  decode join time, not to TTFT).
- Decode: continuous batching. Each replica runs steps over its batch; the batch only changes at step
  boundaries (joins and finishes), and between two changes the steps are advanced in closed form (context grows
  by the batch size per step). A request joins the replica with the most free KV cache that can *reserve* its
  prompt + output tokens; otherwise it waits in a FIFO queue (head of line). Its TPOT is
  (finish - first token) / (output tokens - 1), so KV waiting shows up in TPOT as the client would see it.
- Scaling: a new replica costs GPUs from creation and serves after `startup_s`. Scale-down removes not-ready
  replicas first, then the least-loaded; a removed replica stops taking work and its GPUs are released when its
  running work drains. GPU-hours = sum over replicas of (lifetime x tensor-parallel) / 3600.
- Metrics the controller sees every `interval_s` (as the router/Prometheus would): TTFT p90 over requests
  whose first token came within the window, TPOT p90 over requests finished within it (requests still queued
  are invisible to latency, as in production), instantaneous queue and KV usage (reserved share), the arrival
  rate of prompt tokens and their mean length, the measured prefill throughput per busy second, the decode
  output-token rate, and the router's TTFT stages (`SimConfig.ttft_stages`): p90 of the prefill queue wait and
  of the prefill compute (here TTFT is exactly their sum: no hand-off or first-decode stage is modelled).
- Floors: `BatonController(config, floors=...)` raises minReplicas over time, as an applied plan does.
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from baton.operator.autoscale_policy import (
    ROLES,
    History,
    Observations,
    PolicyConfig,
    RoleObservation,
    decide,
)
from baton.operator.simulate_results import RequestResult, SimResult, TimelinePoint

from baton.profile import WorkerProfile
from baton.workload import Request, percentile

# ------------------------------------------------------------------------------------------ controllers


#: A controller maps what it observes to the desired replicas per role (and a reason per role, for the timeline).
Controller = Callable[[Observations], dict[str, tuple[int, str]]]


#: Replica floors over time (simulated seconds -> role -> minimum), as a planner's `status.plan.applied` sets them.
Floors = Callable[[float], Mapping[str, int]]


class BatonController:
    """The SLO policy (`decide`), keeping its history between calls. `floors`, when given, raises each role's
    `minReplicas` at each evaluation (never above `maxReplicas`), as operator/planner/overlay.py does with an
    applied plan: the planner sizes for the measured load, the policy reacts above it."""

    def __init__(self, config: PolicyConfig, floors: Floors | None = None) -> None:
        self.config = config
        self.floors = floors
        self.history = History()

    def config_at(self, now_s: float) -> PolicyConfig:
        if self.floors is None:
            return self.config
        floors = self.floors(now_s)
        bounds = {}
        for role in ROLES:
            b = self.config.bounds(role)
            low = min(max(b.min_replicas, int(floors.get(role, 0))), b.max_replicas)
            bounds[role] = replace(b, min_replicas=low)
        return replace(self.config, **bounds)

    def __call__(self, obs: Observations) -> dict[str, tuple[int, str]]:
        decisions, self.history = decide(obs, self.config_at(obs.now_s), self.history)
        return {r: (d.desired, d.reason) for r, d in decisions.items()}


def fixed_controller(prefill: int, decode: int) -> Controller:
    return lambda obs: {"prefill": (prefill, "Fixed"), "decode": (decode, "Fixed")}


# ------------------------------------------------------------------------------------------ simulation state


@dataclass
class _Req:
    r: Request
    idx: int
    first_token_s: float | None = None
    prefill_start_s: float | None = None
    finish_s: float | None = None
    finish_step: int = 0


@dataclass
class _Replica:
    role: str
    id: int
    created_s: float
    ready_s: float
    ready: bool = False
    removed: bool = False        # scaled down: takes no new work
    released_s: float | None = None
    # prefill
    busy: bool = False
    # decode
    running: list[_Req] = field(default_factory=list)
    finish_heap: list[tuple[int, int]] = field(default_factory=list)
    steps: int = 0
    ctx: int = 0
    reserved: int = 0
    seg_start_s: float = 0.0
    version: int = 0
    pending: list[_Req] = field(default_factory=list)
    cut_pending: bool = False


@dataclass(frozen=True)
class SimConfig:
    prefill_profile: WorkerProfile
    decode_profile: WorkerProfile
    ttft_slo_s: float = 0.5
    tpot_slo_s: float = 0.05
    interval_s: float = 15.0
    window_s: float = 30.0
    startup_s: float = 60.0
    max_batch_tokens: int = 2048
    kv_transfer_s: float = 0.0
    initial_prefill: int = 1
    initial_decode: int = 1
    #: keep simulating after the last arrival until everything finished, at most this long
    drain_limit_s: float = 600.0
    #: report the router's TTFT stages (prefill queue wait and compute p90) to the controller
    ttft_stages: bool = True


_ARRIVAL, _PREFILL_DONE, _DECODE_EVENT, _READY, _TICK = range(5)


class Simulator:
    """One run: `Simulator(config, trace, controller).run()`."""

    def __init__(self, config: SimConfig, trace: Iterable[Request], controller: Controller) -> None:
        self.c = config
        self.trace = sorted(trace, key=lambda r: r.arrival_s)
        self.controller = controller
        self.now = 0.0
        self._seq = 0
        self.events: list[tuple[float, int, int, Any]] = []
        self.replicas: dict[str, list[_Replica]] = {"prefill": [], "decode": []}
        self._next_id = 0
        self.prefill_queue: deque[_Req] = deque()
        self.queue_tokens = 0
        self.decode_queue: deque[_Req] = deque()
        self.reqs: list[_Req] = []
        self.gpu_seconds = 0.0
        self.timeline: list[TimelinePoint] = []
        # measurement logs, appended in time order
        self.ttft_t: list[float] = []
        self.ttft_v: list[float] = []
        self.ttft_queue_v: list[float] = []      # TTFT stages, aligned with ttft_t
        self.ttft_compute_v: list[float] = []
        self.generated: deque[tuple[float, int]] = deque()             # (time, output tokens produced)
        self.tpot_t: list[float] = []
        self.tpot_v: list[float] = []
        self.arr_t: list[float] = []
        self.arr_tokens_cum: list[int] = [0]
        self.prefill_batches: deque[tuple[float, float, int]] = deque()   # (end, duration, tokens)
        self.decode_busy: deque[tuple[float, float]] = deque()            # (end, duration)
        self.unfinished = 0

    # -------------------------------------------------------------- plumbing
    def _push(self, t: float, kind: int, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, payload))

    def _add_replica(self, role: str, ready_now: bool = False) -> None:
        self._next_id += 1
        delay = 0.0 if ready_now else self.c.startup_s
        rep = _Replica(role, self._next_id, self.now, self.now + delay)
        self.replicas[role].append(rep)
        self._push(rep.ready_s, _READY, rep)

    def _release(self, rep: _Replica) -> None:
        if rep.released_s is None:
            rep.released_s = self.now
            tp = (self.c.prefill_profile if rep.role == "prefill" else self.c.decode_profile).tensor_parallel
            self.gpu_seconds += (self.now - rep.created_s) * tp

    def _active(self, role: str) -> list[_Replica]:
        return [r for r in self.replicas[role] if not r.removed]

    # -------------------------------------------------------------- prefill
    def _dispatch_prefill(self) -> None:
        for rep in self.replicas["prefill"]:
            if not self.prefill_queue:
                return
            if rep.ready and not rep.removed and not rep.busy:
                batch: list[_Req] = []
                tokens = 0
                while self.prefill_queue and (not batch or tokens + self.prefill_queue[0].r.prompt_tokens
                                              <= self.c.max_batch_tokens):
                    q = self.prefill_queue.popleft()
                    q.prefill_start_s = self.now
                    batch.append(q)
                    tokens += q.r.prompt_tokens
                self.queue_tokens -= tokens
                dur = self.c.prefill_profile.prefill_s([q.r.prompt_tokens for q in batch])
                rep.busy = True
                self._push(self.now + dur, _PREFILL_DONE, (rep, batch, dur, tokens))

    def _prefill_done(self, rep: _Replica, batch: list[_Req], dur: float, tokens: int) -> None:
        rep.busy = False
        self.prefill_batches.append((self.now, dur, tokens))
        for q in batch:
            q.first_token_s = self.now
            self.ttft_t.append(self.now)
            self.ttft_v.append(self.now - q.r.arrival_s)
            self.ttft_queue_v.append(q.prefill_start_s - q.r.arrival_s)
            self.ttft_compute_v.append(dur)
            if q.r.output_tokens <= 1:
                self._finish(q)
            elif self.c.kv_transfer_s > 0:
                self._push(self.now + self.c.kv_transfer_s, _DECODE_EVENT, ("join", q))
            else:
                self.decode_queue.append(q)
        if rep.removed:
            self._release(rep)
        self._dispatch_decode()
        self._dispatch_prefill()

    def _finish(self, q: _Req) -> None:
        q.finish_s = self.now
        if q.r.output_tokens > 1:
            self.tpot_t.append(self.now)
            self.tpot_v.append((self.now - q.first_token_s) / (q.r.output_tokens - 1))
        self.unfinished -= 1

    # -------------------------------------------------------------- decode
    def _seg_time(self, rep: _Replica, k: int) -> float:
        """Seconds for k steps of the current batch from the segment start (context grows by bs per step)."""
        bs = len(rep.running)
        a, b, c = self.c.decode_profile.decode_coeffs(bs)
        return (k * (a + c * bs + b * rep.ctx) + b * bs * k * (k - 1) / 2) / 1000.0

    def _steps_by(self, rep: _Replica, dt: float) -> int:
        """Smallest k whose k steps end at or after dt seconds into the segment."""
        bs = len(rep.running)
        a, b, c = self.c.decode_profile.decode_coeffs(bs)
        A = (a + c * bs + b * rep.ctx) / 1000.0
        B = b * bs / 2 / 1000.0
        if B <= 0:
            k = math.ceil(dt / A - 1e-12)
        else:
            # B k^2 + (A - B) k - dt = 0
            k = math.ceil((-(A - B) + math.sqrt((A - B) ** 2 + 4 * B * dt)) / (2 * B) - 1e-12)
        k = max(k, 1)
        while k > 1 and self._seg_time(rep, k - 1) >= dt:
            k -= 1
        while self._seg_time(rep, k) < dt - 1e-12:
            k += 1
        return k

    def _schedule_segment(self, rep: _Replica) -> None:
        rep.version += 1
        rep.seg_start_s = self.now
        if not rep.running:
            return
        k = rep.finish_heap[0][0] - rep.steps
        self._push(self.now + self._seg_time(rep, k), _DECODE_EVENT, ("seg", rep, rep.version, k))

    def _advance(self, rep: _Replica, k: int) -> None:
        """The segment's first k steps are done (now is their end)."""
        bs = len(rep.running)
        if bs:
            self.decode_busy.append((self.now, self.now - rep.seg_start_s))
            self.generated.append((self.now, bs * k))
        rep.steps += k
        rep.ctx += bs * k
        done = set()
        while rep.finish_heap and rep.finish_heap[0][0] <= rep.steps:
            _, idx = heapq.heappop(rep.finish_heap)
            done.add(idx)
        if done:
            keep = []
            for q in rep.running:
                if q.idx in done:
                    rep.ctx -= q.r.prompt_tokens + q.r.output_tokens
                    rep.reserved -= q.r.prompt_tokens + q.r.output_tokens
                    self._finish(q)
                else:
                    keep.append(q)
            rep.running = keep

    def _decode_event(self, payload: tuple) -> None:
        if payload[0] == "join":
            self.decode_queue.append(payload[1])
            self._dispatch_decode()
            return
        _, rep, version, k = payload
        if version != rep.version:
            return
        self._advance(rep, k)
        for q in rep.pending:
            self._join(rep, q)
        rep.pending = []
        rep.cut_pending = False
        if rep.removed and not rep.running:
            self._release(rep)
        self._schedule_segment(rep)
        self._dispatch_decode()

    def _dispatch_decode(self) -> None:
        cap = self.c.decode_profile.kv_capacity_tokens
        while self.decode_queue:
            q = self.decode_queue[0]
            need = q.r.prompt_tokens + q.r.output_tokens
            best = None
            for rep in self.replicas["decode"]:
                if rep.ready and not rep.removed and cap - rep.reserved >= need and (
                        best is None or rep.reserved < best.reserved):
                    best = rep
            if best is None:
                if need > cap:  # larger than a whole replica: can never be served, counts as a miss
                    self.decode_queue.popleft()
                    self.unfinished -= 1
                    continue
                break
            self.decode_queue.popleft()
            best.reserved += need
            if not best.running or (self.now <= best.seg_start_s and not best.cut_pending):
                # idle, or a segment that has not taken a step yet: join right now
                self._join(best, q)
                self._schedule_segment(best)
                continue
            # joins the batch at the next step boundary (or at the segment's end, if sooner)
            best.pending.append(q)
            if not best.cut_pending:
                best.cut_pending = True
                k = min(self._steps_by(best, self.now - best.seg_start_s), best.finish_heap[0][0] - best.steps)
                best.version += 1
                self._push(best.seg_start_s + self._seg_time(best, k), _DECODE_EVENT,
                           ("seg", best, best.version, k))

    def _join(self, rep: _Replica, q: _Req) -> None:
        rep.running.append(q)
        rep.ctx += q.r.prompt_tokens + 1
        q.finish_step = rep.steps + q.r.output_tokens - 1
        heapq.heappush(rep.finish_heap, (q.finish_step, q.idx))

    # -------------------------------------------------------------- measurement
    def _window(self, times: list[float], vals: list[float]) -> list[float]:
        return vals[bisect_left(times, self.now - self.c.window_s):]

    def observe(self) -> Observations:
        w = self.c.window_s
        now = self.now
        ttfts = sorted(self._window(self.ttft_t, self.ttft_v))
        tpots = sorted(self._window(self.tpot_t, self.tpot_v))
        while self.prefill_batches and self.prefill_batches[0][0] < now - w:
            self.prefill_batches.popleft()
        while self.decode_busy and self.decode_busy[0][0] < now - w:
            self.decode_busy.popleft()
        while self.generated and self.generated[0][0] < now - w:
            self.generated.popleft()
        busy_s = sum(min(d, w) for _, d, _ in self.prefill_batches)
        done_tokens = sum(n for _, _, n in self.prefill_batches)
        i = bisect_left(self.arr_t, now - w)
        arrived_tokens = self.arr_tokens_cum[-1] - self.arr_tokens_cum[i]
        arrived = len(self.arr_t) - i
        stages: dict[str, float | None] = {}
        if self.c.ttft_stages:
            stages = {"prefill_queue_p90_s": percentile(self._window(self.ttft_t, self.ttft_queue_v), 90),
                      "prefill_compute_p90_s": percentile(self._window(self.ttft_t, self.ttft_compute_v), 90)}
        p_active = self._active("prefill")
        d_active = self._active("decode")
        p_ready = [r for r in p_active if r.ready]
        d_ready = [r for r in d_active if r.ready]
        cap = self.c.decode_profile.kv_capacity_tokens
        d_busy = sum(min(d, w) for _, d in self.decode_busy)
        prefill = RoleObservation(
            ttft_p90_s=percentile(ttfts, 90),
            queue_tokens=float(self.queue_tokens),
            num_waiting=float(len(self.prefill_queue)),
            prompt_tokens_per_s=arrived_tokens / w,
            mean_prompt_tokens=arrived_tokens / arrived if arrived else None,
            prefill_tokens_per_s=done_tokens / busy_s if busy_s > 0 else None,
            busy_fraction=min(1.0, busy_s / (w * len(p_ready))) if p_ready else None,
            num_running=float(sum(r.busy for r in p_active)),
            current_replicas=len(p_active), ready_replicas=len(p_ready), **stages)
        decode = RoleObservation(
            tpot_p90_s=percentile(tpots, 90),
            num_waiting=float(len(self.decode_queue)),
            kv_cache_usage=(sum(r.reserved for r in d_ready) / (cap * len(d_ready))) if d_ready else None,
            num_running=float(sum(len(r.running) for r in d_active)),
            busy_fraction=min(1.0, d_busy / (w * len(d_ready))) if d_ready else None,
            generation_tokens_per_s=sum(n for _, n in self.generated) / w,
            current_replicas=len(d_active), ready_replicas=len(d_ready))
        return Observations(prefill=prefill, decode=decode, window_s=w, now_s=now)

    # -------------------------------------------------------------- scaling
    def _scale(self, role: str, desired: int) -> None:
        active = self._active(role)
        for _ in range(desired - len(active)):
            self._add_replica(role)
        if desired >= len(active):
            return
        # not-ready first (newest first), then the least loaded
        def load(r: _Replica) -> tuple:
            return (r.ready, (r.busy if role == "prefill" else r.reserved), r.created_s)
        for rep in sorted(active, key=load)[: len(active) - desired]:
            rep.removed = True
            if not rep.ready or (role == "prefill" and not rep.busy) or (
                    role == "decode" and not rep.running and not rep.pending):
                self._release(rep)
        if role == "decode":
            self._dispatch_decode()

    def _tick(self) -> None:
        obs = self.observe()
        decisions = self.controller(obs)
        for role in ROLES:
            self._scale(role, max(0, int(decisions[role][0])))
        self._dispatch_prefill()
        self._dispatch_decode()
        p, d = self._active("prefill"), self._active("decode")
        self.timeline.append(TimelinePoint(self.now, len(p), sum(r.ready for r in p), len(d),
                                           sum(r.ready for r in d), decisions["prefill"][1],
                                           decisions["decode"][1]))

    # -------------------------------------------------------------- main loop
    def run(self) -> SimResult:
        for _ in range(self.c.initial_prefill):
            self._add_replica("prefill", ready_now=True)
        for _ in range(self.c.initial_decode):
            self._add_replica("decode", ready_now=True)
        for i, r in enumerate(self.trace):
            q = _Req(r, i)
            self.reqs.append(q)
            self._push(r.arrival_s, _ARRIVAL, q)
        self.unfinished = len(self.reqs)
        last_arrival = self.trace[-1].arrival_s if self.trace else 0.0
        horizon = last_arrival + self.c.drain_limit_s
        self._push(self.c.interval_s, _TICK)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > horizon:
                break
            self.now = t
            if kind == _ARRIVAL:
                self.prefill_queue.append(payload)
                self.queue_tokens += payload.r.prompt_tokens
                self.arr_t.append(t)
                self.arr_tokens_cum.append(self.arr_tokens_cum[-1] + payload.r.prompt_tokens)
                self._dispatch_prefill()
            elif kind == _PREFILL_DONE:
                self._prefill_done(*payload)
            elif kind == _DECODE_EVENT:
                self._decode_event(payload)
            elif kind == _READY:
                if not payload.removed:
                    payload.ready = True
                    self._dispatch_prefill()
                    self._dispatch_decode()
            elif kind == _TICK:
                if t > last_arrival and self.unfinished <= 0:
                    break
                self._tick()
                self._push(t + self.c.interval_s, _TICK)
        for role in ROLES:
            for rep in self.replicas[role]:
                self._release(rep)
        results = []
        for q in self.reqs:
            tpot = None
            if q.finish_s is not None and q.first_token_s is not None:
                tpot = 0.0 if q.r.output_tokens <= 1 else (q.finish_s - q.first_token_s) / (q.r.output_tokens - 1)
            ttft = None if q.first_token_s is None else q.first_token_s - q.r.arrival_s
            results.append(RequestResult(q.r.arrival_s, q.r.prompt_tokens, q.r.output_tokens, ttft, tpot))
        return SimResult(results, self.timeline, self.gpu_seconds / 3600.0, self.now, self.c.ttft_slo_s,
                         self.c.tpot_slo_s)


def simulate(config: SimConfig, trace: Iterable[Request], controller: Controller) -> SimResult:
    """Run one simulation; deterministic for a given trace (traces are seeded)."""
    return Simulator(config, trace, controller).run()
