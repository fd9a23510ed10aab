"""One serving instance in simulated time, and its goodput by bisection on the request rate.

Three kinds of instance, each a pure function of a latency profile and a list of requests (the shared workload
model), returning what each request saw:

- `prefill_latencies`: a prefill-only instance. One FIFO queue; when idle it takes whole requests from the head
  while their prompt tokens fit the batch limit (at least one). TTFT = batch end - arrival (+ the KV hand-off
  time to the decode instance, when the plan crosses a link). With pipeline stages (`PipelinedProfile`), "idle"
  is the first stage: the next batch starts once the one before has left it, and a batch ends when it has
  passed every stage.
- `decode_latencies`: a decode-only instance with continuous batching (a pipelined one: its profile's step is a
  round of every micro-batch through the stages). A request joins at a step boundary when
  the KV cache can reserve its prompt + output tokens (FIFO, head of line); each step costs the profile's
  decode time for the batch and its total context. TPOT = (finish - arrival) / (output - 1), so waiting for
  KV capacity shows up as it would to a client.
- `colocated_latencies`: prefill and decode in one instance. Without chunked prefill (vLLM as DistServe
  measured it, the shipped vLLM profile): waiting prompts go first (the running batch stalls for the whole
  prefill), else a decode step. With chunked prefill (the Baton engine's `both` worker, Sarathi-Serve; vLLM V1's
  default): every step decodes one token of each running request and spends the rest of the step's token budget
  (`batch_token_limit`) on prompt chunks, the prompt in progress first, then waiting ones (FIFO, when the KV
  cache can reserve the whole sequence). A mixed step costs the prefill fit for its chunks (each chunk's
  attention over the prompt's earlier chunks included) plus the decode fit's per-request and context terms: the
  step's fixed cost is paid once, and decodes advance while a prompt is computed instead of waiting for it.

`max_goodput` bisects the arrival rate (the same requests, arrival times scaled) for the highest rate whose
attainment of the phase's SLO stays at or above the target: DistServe's per-instance goodput.
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from baton.profile import PipelinedProfile, WorkerProfile
from baton.workload import Request, attainment, rescale

_INF = float("inf")


@dataclass(frozen=True)
class Latencies:
    """Per request (in input order): TTFT and TPOT in seconds; None where the request never got there."""

    ttft: list[float | None]
    tpot: list[float | None]


def prefill_latencies(profile: WorkerProfile | PipelinedProfile, requests: Sequence[Request],
                      handoff_s: Callable[[Request], float] | None = None) -> Latencies:
    n = len(requests)
    ttft: list[float | None] = [None] * n
    limit = profile.batch_token_limit
    queue: deque[int] = deque()
    # when each pipeline stage is free again; one stage (no pipeline): the instance's one busy-until time
    stage_free = [0.0] * profile.stages
    t_free = 0.0
    i = 0
    while i < n or queue:
        if not queue:
            t = max(t_free, requests[i].arrival_s)
        else:
            t = t_free
        while i < n and requests[i].arrival_s <= t:
            queue.append(i)
            i += 1
        batch = [queue.popleft()]
        tokens = requests[batch[0]].prompt_tokens
        while queue and tokens + requests[queue[0]].prompt_tokens <= limit:
            tokens += requests[queue[0]].prompt_tokens
            batch.append(queue.popleft())
        lens = [requests[k].prompt_tokens for k in batch]
        if profile.stages == 1:
            done = t_free = t + profile.prefill_s(lens)
        else:  # the batch passes the stages in order, each as soon as the batch before has left it
            hold = profile.prefill_stage_s(lens)
            done = t
            for s in range(profile.stages):
                done = stage_free[s] = max(done, stage_free[s]) + hold
            t_free = stage_free[0]
        for k in batch:
            extra = handoff_s(requests[k]) if handoff_s else 0.0
            ttft[k] = done - requests[k].arrival_s + extra
    return Latencies(ttft, [None] * n)


class _DecodeBatch:
    """The running batch of one instance: steps advance the context of every member by one token."""

    def __init__(self, profile: WorkerProfile | PipelinedProfile) -> None:
        self.profile = profile
        self.step = 0
        self.ctx = 0
        self.reserved = 0
        self.size = 0
        self.finish: list[tuple[int, int]] = []  # (finish step, request index)

    def fits(self, r: Request) -> bool:
        return self.reserved + r.prompt_tokens + r.output_tokens <= self.profile.kv_capacity_tokens

    def join(self, k: int, r: Request) -> None:
        self.reserved += r.prompt_tokens + r.output_tokens
        self.ctx += r.prompt_tokens + 1
        self.size += 1
        heapq.heappush(self.finish, (self.step + r.output_tokens - 1, k))

    def prompt_done(self, k: int, r: Request, t: float, first: list[float], ttft: list[float | None],
                    tpot: list[float | None]) -> None:
        """Request `k`'s prompt was computed by the step that ended at `t` (its KV reserved since admission): its
        first token is out; it joins the running batch for the rest of its output."""
        self.reserved -= r.prompt_tokens + r.output_tokens
        first[k] = t
        ttft[k] = t - r.arrival_s
        if r.output_tokens <= 1:
            tpot[k] = 0.0
        else:
            self.join(k, r)

    def run_step(self) -> float:
        dt = self.profile.decode_step_s(self.size, self.ctx)
        self.advance()
        return dt

    def advance(self) -> None:
        """Every member got one more token (a step ran, its time counted by the caller)."""
        self.step += 1
        self.ctx += self.size

    def step_and_finish(self, t: float, requests: Sequence[Request], first: list[float],
                        tpot: list[float | None]) -> float:
        """Run one step from time `t`; record the TPOT of each request it finishes. Returns the new time."""
        t += self.run_step()
        self.record_finished(t, requests, first, tpot)
        return t

    def record_finished(self, t: float, requests: Sequence[Request], first: list[float], tpot: list[float | None]) -> None:
        """Record the TPOT of each request done by the step that ended at `t`, and let it go."""
        for k in self.pop_finished(requests):
            tpot[k] = (t - first[k]) / (requests[k].output_tokens - 1)

    def pop_finished(self, requests: Sequence[Request]) -> list[int]:
        done = []
        while self.finish and self.finish[0][0] <= self.step:
            _, k = heapq.heappop(self.finish)
            r = requests[k]
            self.ctx -= r.prompt_tokens + r.output_tokens
            self.reserved -= r.prompt_tokens + r.output_tokens
            self.size -= 1
            done.append(k)
        return done


def decode_latencies(profile: WorkerProfile | PipelinedProfile, requests: Sequence[Request]) -> Latencies:
    n = len(requests)
    tpot: list[float | None] = [None] * n
    start = [r.arrival_s for r in requests]  # a decode instance's "first token" is the request's arrival
    batch = _DecodeBatch(profile)
    waiting: deque[int] = deque()
    t = 0.0
    i = 0
    while i < n or waiting or batch.size:
        while i < n and requests[i].arrival_s <= t:
            if requests[i].output_tokens <= 1:
                tpot[i] = 0.0
            elif requests[i].prompt_tokens + requests[i].output_tokens > profile.kv_capacity_tokens:
                pass  # never fits: a miss
            else:
                waiting.append(i)
            i += 1
        while waiting and batch.fits(requests[waiting[0]]):
            k = waiting.popleft()
            batch.join(k, requests[k])
        if not batch.size:
            if i >= n:
                break
            t = requests[i].arrival_s
            continue
        t = batch.step_and_finish(t, requests, start, tpot)
    return Latencies([None] * n, tpot)


def _arrive(profile: WorkerProfile, requests: Sequence[Request], i: int, t: float, waiting: deque[int]) -> int:
    """Queue the requests from index `i` on that have arrived by `t` (a request larger than the whole KV cache
    never runs: left out, a miss); returns the index of the first one still to come."""
    while i < len(requests) and requests[i].arrival_s <= t:
        if requests[i].prompt_tokens + requests[i].output_tokens <= profile.kv_capacity_tokens:
            waiting.append(i)
        i += 1
    return i


def colocated_latencies(profile: WorkerProfile, requests: Sequence[Request], *, chunked: bool = False) -> Latencies:
    """A colocated instance's latencies: whole-prompt prefill steps that stall decodes, or (`chunked`) the
    chunked-prefill schedule (module docstring)."""
    if chunked:
        return _chunked_colocated_latencies(profile, requests)
    n = len(requests)
    ttft: list[float | None] = [None] * n
    tpot: list[float | None] = [None] * n
    first = [0.0] * n
    limit = profile.batch_token_limit
    batch = _DecodeBatch(profile)
    waiting: deque[int] = deque()
    t = 0.0
    i = 0
    while i < n or waiting or batch.size:
        i = _arrive(profile, requests, i, t, waiting)
        if waiting and batch.fits(requests[waiting[0]]):
            chosen: list[int] = []
            tokens = 0
            while waiting and batch.fits(requests[waiting[0]]) and (
                    not chosen or tokens + requests[waiting[0]].prompt_tokens <= limit):
                k = waiting.popleft()
                tokens += requests[k].prompt_tokens
                batch.reserved += requests[k].prompt_tokens + requests[k].output_tokens  # held while prefilling
                chosen.append(k)
            t += profile.prefill_s([requests[k].prompt_tokens for k in chosen])
            for k in chosen:
                batch.prompt_done(k, requests[k], t, first, ttft, tpot)
            continue
        if not batch.size:
            if i >= n:
                break
            t = max(t, requests[i].arrival_s)
            continue
        t = batch.step_and_finish(t, requests, first, tpot)
    return Latencies(ttft, tpot)


def mixed_step_s(profile: WorkerProfile, chunks: Sequence[tuple[int, int]], batch: int, context_tokens: int) -> float:
    """One chunked-prefill step: prompt chunks `(already computed, chunk tokens)` and `batch` decoding requests
    over `context_tokens` of context. Without chunks, a decode step."""
    if not chunks:
        return profile.decode_step_s(batch, context_tokens)
    a, b, c = profile.prefill
    ms = a + b * sum(n for _, n in chunks) + c * sum((done + n) ** 2 - done ** 2 for done, n in chunks)
    if batch:
        _, d_ctx, d_batch = profile.decode_coeffs(batch)
        ms += d_ctx * context_tokens + d_batch * batch
    return ms / 1000.0


def _chunked_colocated_latencies(profile: WorkerProfile, requests: Sequence[Request]) -> Latencies:
    n = len(requests)
    ttft: list[float | None] = [None] * n
    tpot: list[float | None] = [None] * n
    first = [0.0] * n
    limit = profile.batch_token_limit
    batch = _DecodeBatch(profile)
    waiting: deque[int] = deque()
    started: list[list[int]] = []  # [request, prompt tokens computed], admitted: their KV is reserved
    t = 0.0
    i = 0
    while i < n or waiting or started or batch.size:
        i = _arrive(profile, requests, i, t, waiting)
        budget = limit - batch.size
        chunks: list[tuple[int, int]] = []
        for entry in started:
            if budget <= 0:
                break
            k, done = entry
            take = min(requests[k].prompt_tokens - done, budget)
            chunks.append((done, take))
            budget -= take
        while budget > 0 and waiting and batch.fits(requests[waiting[0]]):
            k = waiting.popleft()
            r = requests[k]
            batch.reserved += r.prompt_tokens + r.output_tokens  # held from admission on
            take = min(r.prompt_tokens, budget)
            started.append([k, 0])
            chunks.append((0, take))
            budget -= take
        if not chunks and not batch.size:
            if i >= n:
                break
            t = max(t, requests[i].arrival_s)
            continue
        t += mixed_step_s(profile, chunks, batch.size, batch.ctx)
        batch.advance()
        batch.record_finished(t, requests, first, tpot)
        for entry, (_, take) in zip(list(started[:len(chunks)]), chunks, strict=True):
            entry[1] += take
            k = entry[0]
            r = requests[k]
            if entry[1] < r.prompt_tokens:
                continue
            started.remove(entry)
            batch.prompt_done(k, r, t, first, ttft, tpot)
    return Latencies(ttft, tpot)


# ------------------------------------------------------------------------------------------ goodput


@dataclass(frozen=True)
class Targets:
    """What must hold at a rate: `attainment` of requests within `ttft_s` (when set) and within `tpot_s`
    (when set), each checked on its own, as DistServe checks P90 TTFT and P90 TPOT."""

    ttft_s: float | None
    tpot_s: float | None
    attainment: float = 0.9

    def met(self, lat: Latencies) -> bool:
        n = len(lat.ttft)
        ok = True
        if self.ttft_s is not None:
            ok = attainment(lat.ttft, self.ttft_s, n) >= self.attainment
        if ok and self.tpot_s is not None:
            ok = attainment(lat.tpot, self.tpot_s, n) >= self.attainment
        return ok


def max_goodput(run: Callable[[Sequence[Request]], Latencies], requests: Sequence[Request], targets: Targets,
                *, hi: float = 4096.0, rel_tol: float = 0.01) -> float:
    """The highest arrival rate (req/s) at which `run` over `requests` (re-timed to that rate) meets `targets`;
    0 when not even a trickle does. `requests` give the lengths and the shape of the arrival process."""
    if not requests:
        return 0.0

    def ok(rate: float) -> bool:
        return targets.met(run(rescale(requests, rate)))

    cap = hi
    lo, probe = 0.0, 1.0
    while True:  # bracket: double until a rate fails (or the cap passes)
        if probe >= cap:
            if ok(cap):
                return cap
            hi = cap
            break
        if not ok(probe):
            hi = probe
            break
        lo, probe = probe, probe * 2
    if lo == 0.0:  # even 1 req/s fails: halve (a slow CPU instance may carry 0.05 req/s)
        probe = hi / 2
        while not ok(probe):
            hi, probe = probe, probe / 2
            if probe < 1e-3:
                return 0.0
        lo = probe
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
