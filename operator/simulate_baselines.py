"""A baseline controller for the simulator (operator/simulate.py) modelled on NVIDIA Dynamo's SLA planner.

What it models (Dynamo's design docs, read for the algorithm, no code taken: "Planner Design",
https://docs.nvidia.com/dynamo/latest/design-docs/component-design/planner-design, and "Planner Guide",
https://docs.nvidia.com/dynamo/latest/components/planner/planner-guide; the older "Load-based Planner" page for
the blocking +-1 steps):

* **Throughput-based scaling** every `throughput_interval_s` (Dynamo's `adjustment_interval`, default 180 s):
  1. metrics of the last interval: request rate, mean ISL and OSL, TTFT and ITL;
  2. correction factors `prefill = actual TTFT / expected TTFT`, `decode = actual ITL / expected ITL`, the
     expectations read off the profile at the observed operating point;
  3. a load predictor for the next interval (`constant`: next = last, Dynamo's simplest; `moving-average`
     over the last few intervals stands in for its ARIMA/Kalman/Prophet predictors);
  4. replicas: prefill `ceil(rate x ISL x min(1, prefill_correction) / throughput_per_replica(ISL))`; decode
     `ceil(rate x OSL / throughput_per_replica(ITL target / decode_correction, context = ISL + OSL/2))`, where
     the decode throughput per replica is the best the profile reaches at that ITL with the KV cache it has.
* **Load-based scaling** every evaluation (`interval`): prefill compares the pending prefill tokens per worker
  (+ one ISL) with the most a worker can hold and still meet the TTFT target; decode compares the active KV
  tokens per worker with the most that still meets the ITL target. Up by one if the load is above the target,
  down by one if below target x (n-1)/n x sensitivity; one step per interval, and no step while a previous one
  is still being applied (replicas not ready), as Dynamo's load planner blocks while scaling.
* **Both together**: the throughput-based number is a floor, the load-based loop moves above it.

Where it simplifies:
* Dynamo learns the load-to-latency relation online (sliding-window regression per worker); here the limits come
  from the same profile that drives the simulator, i.e. an exactly calibrated regression (favours the baseline).
* The profile "interpolators" are the DistServe fits of `baton.profile.WorkerProfile`, not a measured NPZ sweep.
* TTFT and ITL are the p90s the simulator reports (Dynamo reads averages); the request rate and ISL come from
  the prompt-token rate and mean prompt length, OSL from the decode output-token rate (rate x OSL).
* Per-worker load is the role's average (the simulator's router balances it), so "all workers above" is
  "the average above".
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from baton.operator.autoscale_policy import Observations, RoleObservation

from baton.profile import WorkerProfile


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def decode_throughput_per_replica(profile: WorkerProfile, itl_s: float, context_tokens: float) -> float:
    """Output tokens/s of one decode replica at the largest batch whose step time meets `itl_s` with every
    request at `context_tokens` of context and whose KV fits; at least batch 1 (never zero)."""
    best = 1.0 / profile.decode_step_s(1, max(1, round(context_tokens)))
    bs = 1
    while True:
        bs += 1
        if bs * context_tokens > profile.kv_capacity_tokens:
            break
        step = profile.decode_step_s(bs, round(bs * context_tokens))
        if step > itl_s:
            break
        best = bs / step
    return best


def decode_max_batch(profile: WorkerProfile, itl_s: float, context_tokens: float) -> int:
    """The largest decode batch that meets `itl_s` at `context_tokens` per request and fits the KV cache."""
    bs = 1
    while ((bs + 1) * context_tokens <= profile.kv_capacity_tokens
           and profile.decode_step_s(bs + 1, round((bs + 1) * context_tokens)) <= itl_s):
        bs += 1
    return bs


@dataclass
class _Sample:
    prompt_tokens_per_s: float
    mean_prompt: float | None
    gen_tokens_per_s: float | None
    ttft: float | None
    itl: float | None
    decode_batch: float | None


class DynamoPlannerController:
    """Dynamo-style SLA planner over the simulator's observations (see the module docstring)."""

    def __init__(self, prefill: WorkerProfile, decode: WorkerProfile, ttft_slo_s: float, itl_slo_s: float, *,
                 min_replicas: int = 1, max_replicas: int = 16, throughput_interval_s: float = 180.0,
                 max_batch_tokens: int = 2048, predictor: str = "constant", history: int = 3,
                 sensitivity: float = 80.0, correction: bool = True) -> None:
        if predictor not in ("constant", "moving-average"):
            raise ValueError(f"predictor: expected constant or moving-average, got {predictor!r}")
        self.p, self.d = prefill, decode
        self.ttft_slo, self.itl_slo = ttft_slo_s, itl_slo_s
        self.lo, self.hi = min_replicas, max_replicas
        self.interval = throughput_interval_s
        self.max_batch_tokens = max_batch_tokens
        self.predictor, self.sensitivity, self.correction = predictor, sensitivity, correction
        self.samples: list[_Sample] = []             # this throughput interval's observations
        self.intervals: deque[_Sample] = deque(maxlen=max(1, history))   # past intervals' averages
        self.next_plan_s: float | None = None
        self.floor = {"prefill": min_replicas, "decode": min_replicas}
        self.last = {"prefill": "", "decode": ""}

    # ------------------------------------------------------------------ throughput-based
    def _average(self) -> _Sample | None:
        if not self.samples:
            return None

        def mean(xs: list[float | None]) -> float | None:
            v = [x for x in xs if x is not None]
            return sum(v) / len(v) if v else None
        s = self.samples
        return _Sample(sum(x.prompt_tokens_per_s for x in s) / len(s), mean([x.mean_prompt for x in s]),
                       mean([x.gen_tokens_per_s for x in s]), mean([x.ttft for x in s]), mean([x.itl for x in s]),
                       mean([x.decode_batch for x in s]))

    def _predict(self) -> _Sample | None:
        if not self.intervals:
            return None
        if self.predictor == "constant":
            return self.intervals[-1]
        xs = list(self.intervals)
        avg = lambda f: (sum(v for v in (f(x) for x in xs) if v is not None) /
                         max(1, sum(f(x) is not None for x in xs)))
        return _Sample(avg(lambda x: x.prompt_tokens_per_s), avg(lambda x: x.mean_prompt),
                       avg(lambda x: x.gen_tokens_per_s), xs[-1].ttft, xs[-1].itl, xs[-1].decode_batch)

    def plan(self, last: _Sample, nxt: _Sample) -> dict[str, int]:
        """Throughput-based replicas for the predicted interval `nxt`, corrected by what `last` measured."""
        isl = max(1.0, nxt.mean_prompt or 1.0)
        # prefill: the profile's TTFT for one prompt of ISL is the expectation; min(1, ·) as Dynamo does
        p_corr = 1.0
        if self.correction and last.ttft:
            p_corr = last.ttft / self.p.prefill_s([round(isl)])
        load = nxt.prompt_tokens_per_s * min(1.0, p_corr)
        cap = self.p.prefill_tokens_per_s(round(isl), self.max_batch_tokens)
        n_p = _ceil(load / cap) if load > 0 else 0
        # decode: rate x OSL is the output-token rate; OSL from it and the request rate
        rate = nxt.prompt_tokens_per_s / isl
        gen = nxt.gen_tokens_per_s or 0.0
        osl = gen / rate if rate > 0 else 0.0
        ctx = isl + osl / 2
        d_corr = 1.0
        if self.correction and last.itl and last.decode_batch:
            bs = max(1, round(last.decode_batch))
            d_corr = last.itl / self.d.decode_step_s(bs, round(bs * ctx))
        itl = self.itl_slo / d_corr if d_corr > 0 else self.itl_slo
        thpt = decode_throughput_per_replica(self.d, itl, ctx)
        n_d = _ceil(gen / thpt) if gen > 0 else 0
        return {"prefill": n_p, "decode": n_d}

    # ------------------------------------------------------------------ load-based
    def load_step(self, role: str, o: RoleObservation, ctx: float | None) -> int:
        """-1, 0 or +1 from the role's load per ready worker against its SLO-derived limit."""
        ready = o.ready_replicas or 0
        n = o.current_replicas or 0
        if ready < n or ready == 0:
            return 0                      # a scaling step is still being applied: blocked
        if role == "prefill":
            cap = o.prefill_tokens_per_s
            if not cap or o.queue_tokens is None:
                return 0
            isl = o.mean_prompt_tokens or 0.0
            load = o.queue_tokens / ready + isl
            limit = cap * self.ttft_slo      # prompt tokens one worker prefills within the TTFT target
        else:
            if o.kv_cache_usage is None or not ctx:
                return 0
            load = o.kv_cache_usage * self.d.kv_capacity_tokens
            limit = decode_max_batch(self.d, self.itl_slo, ctx) * ctx
        if load > limit:
            return 1
        if n > 1 and load < limit * (n - 1) / n * self.sensitivity / 100:
            return -1
        return 0

    def __call__(self, obs: Observations) -> dict[str, tuple[int, str]]:
        p, d = obs.prefill, obs.decode
        running = d.num_running / d.ready_replicas if d.num_running is not None and d.ready_replicas else None
        self.samples.append(_Sample(p.prompt_tokens_per_s or 0.0, p.mean_prompt_tokens, d.generation_tokens_per_s,
                                    p.ttft_p90_s, d.tpot_p90_s, running))
        if self.next_plan_s is None:
            self.next_plan_s = obs.now_s + self.interval
        elif obs.now_s >= self.next_plan_s:
            avg = self._average()
            self.samples = []
            self.next_plan_s = obs.now_s + self.interval
            if avg is not None:
                self.intervals.append(avg)
                nxt = self._predict()
                if nxt is not None:
                    self.floor = self.plan(avg, nxt)
        isl = p.mean_prompt_tokens or 0.0
        last = self.intervals[-1] if self.intervals else None
        osl = 0.0
        if last and last.mean_prompt and last.prompt_tokens_per_s > 0 and last.gen_tokens_per_s:
            osl = last.gen_tokens_per_s / (last.prompt_tokens_per_s / last.mean_prompt)
        ctx = (isl + osl / 2) if isl else None
        out = {}
        for role, o in (("prefill", p), ("decode", d)):
            cur = o.current_replicas or 0
            step = self.load_step(role, o, ctx)
            floor = min(max(self.floor[role], self.lo), self.hi)
            want = min(max(cur + step, floor, self.lo), self.hi)
            reason = "ThroughputFloor" if want == floor and want != cur + step else (
                "LoadUp" if step > 0 else "LoadDown" if step < 0 else "Hold")
            out[role] = (want, reason)
        return out
