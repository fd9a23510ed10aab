"""The one workload model: length distributions, arrival processes, the trace schema and the percentile.

`baton bench` (measures a live endpoint), `baton simulate` (the autoscaler in simulated time) and the planner
(`baton plan`, `spec.planner`) all describe load with these, so a simulated p90 and a measured p90 are computed
the same way over the same kind of requests and can be put side by side.

Pure: no I/O except reading and writing a trace file.

Trace schema (JSONL, one request per line; `#` lines and blank lines are skipped):

    {"timestamp": 12.5, "input_len": 512, "output_len": 64}
    {"timestamp": 13.1, "prompt": "Tell me about ...", "output_len": 32}

`timestamp` is in seconds (any origin: times are made relative to the first request), `input_len` is the prompt
length in tokens (optional when `prompt` gives the text), `output_len` the tokens to generate.

Lengths: a trace is replayed (`Workload.from_trace`: its own (input, output) pairs, each request as it was); a
parametric distribution (fixed, uniform, a lognormal from a mean and a spread) is for when only moments are
known. Real length distributions are often not lognormal (chat traces are long-tailed and often bimodal), and a
lognormal fitted to their moments moves the median and the p90 that SLOs are judged on.

Percentiles: linear interpolation between closest ranks (numpy's default, and what vLLM's benchmark reports).
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRACE_FIELDS = ("timestamp", "input_len", "output_len", "prompt")


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it arrives (seconds from the start) and its lengths in tokens."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt: str | None = None


# ------------------------------------------------------------------------------------------ parsing


def parse_duration(text: str, *, flag: str = "duration") -> float:
    """`500ms`, `0.5s`, `2m`, `1h` -> seconds. A bare number is refused (ambiguous: ms or s?)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|µs|ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"{flag}: expected a duration with a unit such as 500ms, 0.5s or 2m, got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


# ------------------------------------------------------------------------------------------ lengths


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed N, uniform [lo, hi] (integers, inclusive), lognormal with the given
    mean and standard deviation *of the lengths themselves*, clipped to [minimum, maximum], or empirical: the
    lengths a trace observed, drawn as they are (`a` is their mean, `values` the lengths, sorted)."""

    kind: str
    a: float
    b: float = 0.0
    minimum: int = 1
    maximum: int | None = None
    values: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls("fixed", n)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> LengthDist:
        return cls("uniform", lo, hi)

    @classmethod
    def lognormal(cls, mean: float, sd: float, minimum: int = 1, maximum: int | None = None) -> LengthDist:
        return cls("lognormal", mean, sd, minimum, maximum)

    @classmethod
    def empirical(cls, values: Iterable[int]) -> LengthDist:
        """The observed lengths themselves (no fit): sampling draws one of them, so every quantile is the
        data's own."""
        xs = tuple(sorted(int(v) for v in values))
        if not xs or xs[0] < 1:
            raise ValueError("empirical lengths need at least one value, each at least 1")
        return cls("empirical", sum(xs) / len(xs), 0.0, xs[0], xs[-1], xs)

    @classmethod
    def parse(cls, text: str, *, flag: str = "length") -> LengthDist:
        """`N`, `uniform:LO:HI`, `lognormal:MEAN:SD` or `lognormal:MEAN:SD:MIN:MAX`."""
        usage = f"{flag}: expected N, uniform:LO:HI or lognormal:MEAN:SD[:MIN:MAX], got {text!r}"
        parts = [p.strip() for p in str(text).split(":")]
        try:
            if len(parts) == 1:
                n = int(parts[0])
                if n < 1:
                    raise ValueError
                return cls("fixed", n)
            kind, nums = parts[0].lower(), [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(usage) from None
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
            return cls("fixed", int(nums[0]))
        if kind == "uniform" and len(nums) == 2:
            lo, hi = nums
            if not 1 <= lo <= hi:
                raise ValueError(f"{flag}: uniform needs 1 <= LO <= HI, got {text!r}")
            return cls("uniform", int(lo), int(hi))
        if kind == "lognormal" and len(nums) in (2, 4):
            mean, sd = nums[:2]
            if mean <= 0 or sd < 0:
                raise ValueError(f"{flag}: lognormal needs MEAN > 0 and SD >= 0, got {text!r}")
            lo, hi = (int(nums[2]), int(nums[3])) if len(nums) == 4 else (1, None)
            if lo < 1 or (hi is not None and hi < lo):
                raise ValueError(f"{flag}: lognormal needs 1 <= MIN <= MAX, got {text!r}")
            return cls("lognormal", mean, sd, lo, hi)
        raise ValueError(usage)

    @property
    def mean(self) -> float:
        """The nominal mean (before clipping)."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a

    @property
    def upper(self) -> int | None:
        """The largest length this distribution can give (None: unbounded)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return self.maximum

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = int(self.a)
        elif self.kind == "empirical":
            return self.values[rng.randrange(len(self.values))]
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        else:
            mean, sd = self.a, self.b
            if sd == 0:
                n = round(mean)
            else:
                sigma2 = math.log(1 + (sd / mean) ** 2)
                mu = math.log(mean) - sigma2 / 2
                n = round(rng.lognormvariate(mu, math.sqrt(sigma2)))
        n = max(self.minimum, n)
        if self.maximum is not None:
            n = min(self.maximum, n)
        return n

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        if self.kind == "empirical":
            return (f"empirical (median {percentile(self.values, 50):g}, p90 {percentile(self.values, 90):g}, "
                    f"max {self.values[-1]})")
        clip = f":{self.minimum}:{self.maximum}" if self.maximum is not None else ""
        return f"lognormal:{self.a:g}:{self.b:g}{clip}"


# ------------------------------------------------------------------------------------------ arrivals


def poisson_arrivals(rate: float, rng: random.Random, *, num_requests: int | None = None,
                     duration: float | None = None) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process at `rate`/s, stopped after
    `num_requests` arrivals or at `duration` seconds, whichever comes first. `rate=inf`: all at 0."""
    if num_requests is None and duration is None:
        raise ValueError("give num_requests or duration")
    if math.isinf(rate):
        if num_requests is None:
            raise ValueError("an infinite rate needs num_requests")
        return [0.0] * num_requests
    if not rate > 0:
        raise ValueError(f"rate must be greater than 0, got {rate}")
    out: list[float] = []
    t = 0.0
    while num_requests is None or len(out) < num_requests:
        t += rng.expovariate(rate)
        if duration is not None and t > duration:
            break
        out.append(t)
    return out


def piecewise_poisson_arrivals(rate_steps: Sequence[tuple[float, float]], duration_s: float,
                               rng: random.Random) -> list[float]:
    """Poisson arrivals whose rate (req/s) is piecewise constant: `rate_steps` = [(start_s, rate), ...]."""
    steps = sorted(rate_steps)
    out: list[float] = []
    for i, (start, rate) in enumerate(steps):
        end = min(steps[i + 1][0] if i + 1 < len(steps) else duration_s, duration_s)
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append(t)
    return out


def on_off_steps(base_rate: float, burst_rate: float, on_s: float, off_s: float,
                 duration_s: float) -> list[tuple[float, float]]:
    """Rate steps of bursts: `base_rate` for `off_s`, then `burst_rate` for `on_s`, repeated."""
    steps: list[tuple[float, float]] = []
    t = 0.0
    while t < duration_s:
        steps.append((t, base_rate))
        steps.append((t + off_s, burst_rate))
        t += off_s + on_s
    return steps


def with_lengths(arrivals: Iterable[float], prompt: LengthDist, output: LengthDist,
                 rng: random.Random) -> list[Request]:
    """Requests at the given arrival times with sampled lengths."""
    return [Request(t, prompt.sample(rng), output.sample(rng)) for t in arrivals]


def poisson_requests(rate_steps: Sequence[tuple[float, float]], duration_s: float, prompt: LengthDist,
                     output: LengthDist, seed: int = 0) -> list[Request]:
    """A seeded trace: piecewise-constant Poisson arrivals (`[(start_s, rate), ...]`) with sampled lengths.
    For bursts, pass `on_off_steps(...)` as the rate steps."""
    times = piecewise_poisson_arrivals(rate_steps, duration_s, random.Random(seed))
    return with_lengths(times, prompt, output, random.Random(seed + 1))


@dataclass(frozen=True)
class Workload:
    """Steady load: Poisson arrivals at `rate` req/s with the given length distributions.

    `requests(n, seed)` is deterministic, and the same seed gives the same lengths at every rate (only the
    arrival times scale), so rates can be compared request for request.

    `pairs` (from `from_trace`): observed (prompt, output) length pairs. When set, requests replay them as
    pairs -- a long prompt keeps its own output length, which two independent marginals would not -- and
    `prompt`/`output` are their marginals (empirical), for reports and bounds."""

    rate: float
    prompt: LengthDist
    output: LengthDist
    pairs: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    @classmethod
    def from_trace(cls, requests: Sequence[Request], *, where: str = "trace") -> Workload:
        """Replay a trace's lengths (every request needs its input length: prompts are not tokenized here) at
        its mean arrival rate (0 when it has no span: no target). `where` names the trace in errors."""
        if not requests:
            raise ValueError(f"{where}: no requests in the trace")
        missing = sum(1 for r in requests if r.prompt_tokens < 1)
        if missing:
            raise ValueError(f"{where}: {missing} of {len(requests)} requests have no input_len (the planner "
                             "needs input_len on every line: prompts are not tokenized)")
        pairs = tuple((r.prompt_tokens, r.output_tokens) for r in requests)
        span = requests[-1].arrival_s - requests[0].arrival_s
        rate = (len(requests) - 1) / span if len(requests) > 1 and span > 0 else 0.0
        return cls(rate, LengthDist.empirical(p for p, _ in pairs), LengthDist.empirical(o for _, o in pairs),
                   pairs)

    def sample_lengths(self, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """`n` (prompt, output) length pairs. A trace is replayed in shuffled passes (each pass every request
        once, in a fresh random order): `n` a multiple of the trace's size gives its exact distribution, and
        any `n` varies less than draws with replacement would."""
        if not self.pairs:
            return [(self.prompt.sample(rng), self.output.sample(rng)) for _ in range(n)]
        out: list[tuple[int, int]] = []
        while len(out) < n:
            batch = list(self.pairs)
            rng.shuffle(batch)
            out.extend(batch[:n - len(out)])
        return out

    def requests(self, n: int, seed: int = 0, rate: float | None = None) -> list[Request]:
        times = poisson_arrivals(self.rate if rate is None else rate, random.Random(seed), num_requests=n)
        lengths = self.sample_lengths(len(times), random.Random(seed + 1))
        return [Request(t, p, o) for t, (p, o) in zip(times, lengths, strict=True)]

    def lengths_model(self) -> str:
        """How lengths are drawn, for reports: a trace replay, or the distributions (a lognormal is a fit to
        moments: a mean and a spread, or a mean and a p90)."""
        if self.pairs:
            return f"trace replay of {len(self.pairs)} requests"
        words = {"lognormal": "fitted lognormal", "empirical": "empirical"}
        kinds = [words.get(d.kind, d.kind) for d in (self.prompt, self.output)]
        return kinds[0] if kinds[0] == kinds[1] else f"input {kinds[0]}, output {kinds[1]}"

    def describe(self) -> str:
        return f"{self.rate:g} req/s, input {self.prompt}, output {self.output} ({self.lengths_model()})"


#: Chat lengths like ShareGPT as DistServe used it for OPT (2048-token context): mean input ~755 tokens,
#: mean output ~200, long-tailed. An approximation by lognormals, not the data set itself.
SHAREGPT_LIKE = Workload(rate=1.0, prompt=LengthDist.lognormal(755, 700, 4, 1536),
                         output=LengthDist.lognormal(200, 230, 2, 512))

#: Named length presets for `--workload`.
PRESETS = {"sharegpt": SHAREGPT_LIKE}


# ------------------------------------------------------------------------------------------ traces


def load_trace(path: str | Path) -> list[Request]:
    """Read a JSONL trace (schema in the module docstring). Sorted by time, times relative to the first
    request. Every problem names the file and line."""
    rows: list[Request] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 - reported like the rest
            unknown = sorted(set(obj) - set(TRACE_FIELDS))
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (a trace line has "
                                 f"{', '.join(TRACE_FIELDS)})")
            try:
                ts = float(obj["timestamp"])
                out_len = int(obj["output_len"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: needs a numeric timestamp and output_len") from None
            prompt = obj.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"{where}: prompt must be a string")
            try:
                in_len = int(obj.get("input_len") or 0)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: input_len must be an integer") from None
            if prompt is None and in_len < 1:
                raise ValueError(f"{where}: needs prompt or input_len (at least 1)")
            if out_len < 1:
                raise ValueError(f"{where}: output_len must be at least 1")
            rows.append(Request(ts, in_len, out_len, prompt))
    if not rows:
        raise ValueError(f"{path}: no requests in the trace")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    return [Request(r.arrival_s - t0, r.prompt_tokens, r.output_tokens, r.prompt) for r in rows]


def dump_trace(requests: Iterable[Request], path: str | Path) -> None:
    """Write requests in the trace schema (the inverse of `load_trace`)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            row: dict[str, object] = {"timestamp": round(r.arrival_s, 6), "input_len": r.prompt_tokens,
                                      "output_len": r.output_tokens}
            if r.prompt is not None:
                row["prompt"] = r.prompt
            f.write(json.dumps(row) + "\n")


def rescale(requests: Sequence[Request], rate: float) -> list[Request]:
    """The same requests with arrival gaps scaled so the mean rate is `rate` (inf: all at once)."""
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    if len(requests) < 2 or span <= 0:
        return list(requests)
    scale = 0.0 if math.isinf(rate) else ((len(requests) - 1) / span) / rate
    return [Request(r.arrival_s * scale, r.prompt_tokens, r.output_tokens, r.prompt) for r in requests]


# ------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (q in 0..100) with linear interpolation between closest ranks (numpy's default).
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def attainment(values: Sequence[float | None], target: float, total: int | None = None) -> float:
    """Share of `total` (default: len(values)) requests whose value is within `target`; None counts as a miss."""
    n = len(values) if total is None else total
    if n == 0:
        return 1.0
    return sum(1 for v in values if v is not None and v <= target) / n
