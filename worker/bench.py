"""`baton bench`: replay a serving workload against any OpenAI-compatible endpoint and report TTFT, TPOT,
throughput, SLO attainment and goodput.

    baton bench --url http://127.0.0.1:8080/v1 --rate 2,4,8 --num-requests 100 \\
        --input-len uniform:512:1024 --output-len uniform:32:64 --slo-ttft 500ms --slo-tpot 50ms

Workload: Poisson arrivals at `--rate` requests/s (a comma list sweeps rates; `inf` sends everything at once),
or a JSONL trace (`{"timestamp", "prompt" | "input_len", "output_len"}` per line; with `--rate` the trace's
gaps are rescaled to that mean rate). Lengths are `N` (fixed), `uniform:LO:HI` or `lognormal:MEAN:SD`
(in tokens). Prompts are random words; a calibration request first measures the endpoint's tokens per word
(`usage.prompt_tokens`), so a prompt of N words hits about the requested token count. Requests stream
(`stream_options.include_usage`) with `ignore_eos` so output lengths are what was asked.

Per request: TTFT = time to the first chunk with content; TPOT = (e2e - TTFT) / (output tokens - 1).
A request meets the SLO when it completed and both its TTFT and TPOT are within the targets (a one-token
answer has no TPOT and meets that half). Attainment counts failed requests as misses.

Goodput (DistServe): the highest request rate at which at least `--attainment` (default 90 %) of requests
meet both SLOs. With a sweep it is the highest swept rate such that it and every lower swept rate pass;
`--goodput-search` then narrows it by bisection between that rate and the next failing one (and expands the
range by doubling/halving when every or no swept rate passes).

The pure parts (length sampling, arrivals, percentiles, attainment, goodput search) have no I/O and are unit
tested; the CLI maps user mistakes (unreachable endpoint, unknown model, bad flags) to one-line errors.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baton.workload import (
    LengthDist,
    Request,
    load_trace,
    parse_duration,
    percentile,
    poisson_arrivals,
    rescale,
)

# ------------------------------------------------------------------------------------------ pure parts


def parse_rates(text: str) -> list[float]:
    """`2`, `1,2,4`, `inf` -> sorted distinct rates in requests/s (all > 0)."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise ValueError(f"--rate: not a number: {part!r}") from None
        if not r > 0:
            raise ValueError(f"--rate: must be greater than 0, got {part}")
        rates.append(r)
    if not rates:
        raise ValueError("--rate: give at least one rate")
    return sorted(set(rates))


@dataclass
class RequestResult:
    """What one request did, as the client saw it (times in seconds)."""

    ok: bool
    start: float = 0.0  # offset from the run's start when it was sent
    input_len: int = 0  # tokens asked for (or the server's usage.prompt_tokens when known)
    output_len: int = 0  # tokens received (usage.completion_tokens when given, else content chunks)
    expected_output_len: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    error: str = ""


def meets_slo(r: RequestResult, slo_ttft: float | None, slo_tpot: float | None) -> bool:
    """Completed, TTFT within `slo_ttft` and TPOT within `slo_tpot` (None: no target for that half)."""
    if not r.ok:
        return False
    if slo_ttft is not None and (r.ttft is None or r.ttft > slo_ttft):
        return False
    return slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot


def summarize(
    results: Sequence[RequestResult],
    wall: float,
    *,
    slo_ttft: float | None,
    slo_tpot: float | None,
    quantiles: Sequence[float] = (50, 90, 99),
) -> dict[str, Any]:
    """Aggregate numbers of one run: counts, latency percentiles, throughput and SLO attainment."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    n = len(results)

    def pct(xs: Sequence[float]) -> dict[str, float | None]:
        d: dict[str, float | None] = {f"p{q:g}": percentile(xs, q) for q in quantiles}
        d["mean"] = sum(xs) / len(xs) if xs else None
        return d

    out_tokens = sum(r.output_len for r in ok)
    errors: dict[str, int] = {}  # grouped by message with numbers masked; the first example is the key
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            msg = r.error.splitlines()[0][:200] if r.error else "unknown error"
            key = examples.setdefault(re.sub(r"\d+(\.\d+)?", "#", msg), msg)
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "duration_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
        "input_tokens_mean": sum(r.input_len for r in ok) / len(ok) if ok else None,
        "output_tokens_mean": out_tokens / len(ok) if ok else None,
        "short_outputs": sum(1 for r in ok if r.expected_output_len and r.output_len < r.expected_output_len),
        "ttft_s": pct(ttfts),
        "tpot_s": pct(tpots),
        "e2e_s": pct(e2es),
        "slo_ttft_s": slo_ttft,
        "slo_tpot_s": slo_tpot,
        "ttft_attainment": (sum(1 for r in ok if slo_ttft is None or (r.ttft is not None and r.ttft <= slo_ttft))
                            / n if n else None),
        "tpot_attainment": (sum(1 for r in ok if slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot)
                            / n if n else None),
        "slo_attainment": sum(1 for r in results if meets_slo(r, slo_ttft, slo_tpot)) / n if n else None,
        "errors": errors,
    }


def goodput_from_sweep(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Highest rate r such that r and every lower measured rate reach `target` attainment (None: the lowest
    rate already fails). `points` are (rate, attainment) pairs in any order."""
    best = None
    for rate, attainment in sorted(points):
        if attainment is None or attainment < target:
            break
        best = rate
    return best


@dataclass
class SearchResult:
    goodput: float | None
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment), in the order run
    bracket: tuple[float | None, float | None] = (None, None)  # (highest passing, lowest failing above it)


def goodput_search(
    evaluate: Callable[[float], float],
    rates: Sequence[float],
    target: float,
    *,
    steps: int = 3,
    max_expand: int = 4,
    rel_tol: float = 0.05,
    search: bool = True,
) -> SearchResult:
    """Goodput by measurement: evaluate (rate -> attainment) every rate in `rates`, then (with `search`)
    expand the range by doubling/halving until a passing and a failing rate bracket the goodput (at most
    `max_expand` extra runs), then bisect at most `steps` times or until the bracket is within `rel_tol`."""
    points: list[tuple[float, float]] = []
    done: dict[float, float] = {}

    def run(rate: float) -> float:
        if rate not in done:
            done[rate] = evaluate(rate)
            points.append((rate, done[rate]))
        return done[rate]

    for r in sorted(set(rates)):
        run(r)

    def bracket() -> tuple[float | None, float | None]:
        lo = goodput_from_sweep(list(done.items()), target)
        above = [r for r in sorted(done) if lo is None or r > lo]
        hi = above[0] if above else None  # the first failing rate (everything above lo that was run failed
        return lo, hi                     # or is beyond the first failure)

    if not search:
        return SearchResult(goodput_from_sweep(points, target), points, bracket())
    lo, hi = bracket()
    for _ in range(max_expand):
        if lo is None and hi is not None:  # even the lowest rate fails: go down
            run(hi / 2)
        elif hi is None and lo is not None and not math.isinf(lo):  # everything passes: go up
            run(lo * 2)
        else:
            break
        lo, hi = bracket()
    for _ in range(steps):
        if lo is None or hi is None or math.isinf(hi) or (hi - lo) <= rel_tol * lo:
            break
        run((lo + hi) / 2)
        lo, hi = bracket()
    return SearchResult(lo, points, (lo, hi))


# Words for synthetic prompts: common English, mostly single BPE tokens in real tokenizers.
WORDS = (  # noqa: SIM905 - a readable paragraph
    "the of and to in is was for on that with as by at from this be are or an have it not which were has "
    "one their all more been but had its new also other some time there first after two would can only "
    "about into most many such these when over years who may her so made people world part state used "
    "city during between then three year well both water under while since later work found number long "
    "day place called where small house south north west east great music each life name back high early "
    "second own war national school same home film large known family company river group area music team "
    "old very make game local market light ocean boat fish village story child morning evening silver "
    "island storm ship token model cache memory batch request server cluster service deploy replica "
    "machine question answer weather sun sky bird tree poem deep wide tide sound thunder travel close"
).split()


class PromptMaker:
    """Random-word prompts of about `n` tokens, given the endpoint's measured tokens per word."""

    def __init__(self, tokens_per_word: float = 1.0, words: Sequence[str] = WORDS) -> None:
        self.tokens_per_word = max(tokens_per_word, 1e-3)
        self.words = list(words)

    def make(self, n_tokens: int, rng: random.Random) -> str:
        n_words = max(1, round(n_tokens / self.tokens_per_word))
        return " ".join(rng.choice(self.words) for _ in range(n_words))


@dataclass
class WorkItem:
    at: float  # seconds after the start of the run
    prompt: str
    input_len: int
    output_len: int


def trace_schedule(
    rows: Sequence[Request],
    maker: PromptMaker,
    rng: random.Random,
    *,
    rate: float | None = None,
    num_requests: int | None = None,
    duration: float | None = None,
) -> list[WorkItem]:
    """Work items from a trace; with `rate`, times are scaled so the mean arrival rate equals `rate`."""
    rows = list(rows[:num_requests] if num_requests else rows)
    if rate is not None:
        rows = rescale(rows, rate)
    items = []
    for r in rows:
        if duration is not None and r.arrival_s > duration:
            break
        prompt = r.prompt if r.prompt is not None else maker.make(r.prompt_tokens, rng)
        items.append(WorkItem(r.arrival_s, prompt, r.prompt_tokens, r.output_tokens))
    return items


def synthetic_schedule(
    rate: float,
    input_len: LengthDist,
    output_len: LengthDist,
    maker: PromptMaker,
    seed: int,
    *,
    num_requests: int | None,
    duration: float | None,
) -> list[WorkItem]:
    """The same seed gives the same lengths at every rate (only the arrival times scale), but other prompt
    words: a server with prefix caching (vLLM's, Baton's) would otherwise answer every rate after the first
    from its cache, and a sweep would measure the cache instead of the load."""
    rng_t = random.Random(seed)
    rng_l = random.Random(seed + 1)
    rng_w = random.Random(f"{seed}:{rate!r}")
    times = poisson_arrivals(rate, rng_t, num_requests=num_requests, duration=duration)
    items = []
    for at in times:
        n_in, n_out = input_len.sample(rng_l), output_len.sample(rng_l)
        items.append(WorkItem(at, maker.make(n_in, rng_w), n_in, n_out))
    return items


def _json_rate(r: float | None) -> float | str | None:
    return "inf" if r is not None and math.isinf(r) else r


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f}ms" if x < 10 else f"{x:.2f}s"


def fmt_rate(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:g}"


def format_summary(rate_label: str, s: dict[str, Any]) -> str:
    lines = [
        f"== rate {rate_label}: {s['completed']}/{s['requests']} completed"
        + (f", {s['failed']} failed" if s["failed"] else "")
        + f" in {s['duration_s']:.1f}s",
        (f"   TTFT  p50 {fmt_s(s['ttft_s']['p50'])}  p90 {fmt_s(s['ttft_s']['p90'])}  "
         f"p99 {fmt_s(s['ttft_s']['p99'])}"),
        (f"   TPOT  p50 {fmt_s(s['tpot_s']['p50'])}  p90 {fmt_s(s['tpot_s']['p90'])}  "
         f"p99 {fmt_s(s['tpot_s']['p99'])}"),
        f"   throughput {s['throughput_rps'] or 0:.2f} req/s, {s['output_tokens_per_s'] or 0:.1f} output tok/s"
        + (f"  (mean input {s['input_tokens_mean']:.0f} tok, output {s['output_tokens_mean']:.0f} tok)"
           if s["input_tokens_mean"] is not None else ""),
    ]
    if s["slo_ttft_s"] is not None or s["slo_tpot_s"] is not None:
        lines.append(
            f"   SLO (TTFT <= {fmt_s(s['slo_ttft_s'])}, TPOT <= {fmt_s(s['slo_tpot_s'])}): "
            f"{100 * s['slo_attainment']:.1f}% met both (TTFT {100 * s['ttft_attainment']:.1f}%, "
            f"TPOT {100 * s['tpot_attainment']:.1f}%)"
        )
    if s["short_outputs"]:
        lines.append(f"   note: {s['short_outputs']} responses were shorter than asked (ignore_eos unsupported?)")
    for err, count in list(s["errors"].items())[:5]:
        lines.append(f"   error x{count}: {err}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """A progress bar on a TTY, otherwise a line every `interval` seconds (never both, never on stdout)."""

    def __init__(self, total: int, label: str, *, stream=None, enabled: bool = True, interval: float = 10.0):
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._last = self.t0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self._draw(now)
        elif now - self._last >= self.interval:
            self._last = now
            print(self._text(now), file=self.stream, flush=True)

    def _text(self, now: float) -> str:
        fail = f", {self.failed} failed" if self.failed else ""
        return f"{self.label}: {self.done}/{self.total} done{fail} ({now - self.t0:.0f}s)"

    def _draw(self, now: float) -> None:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self._text(now).split(': ', 1)[1]}")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
        else:
            print(self._text(time.monotonic()), file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------ I/O


@dataclass
class Target:
    url: str  # base URL ending in /v1
    model: str
    api: str = "completions"  # or "chat"
    ignore_eos: bool = True
    timeout: float = 300.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        return body

    @property
    def path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"


def _describe_http_error(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc}" if str(exc) else "connection failed"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection closed mid-response: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _error_message(status: int, text: str) -> str:
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text.strip()[:200]
    return f"HTTP {status}: {msg}"


async def send_request(client, target: Target, item: WorkItem, t_run0: float) -> RequestResult:
    """One streaming request; never raises (a failure is a RequestResult with ok=False)."""
    import httpx

    start = time.perf_counter()
    res = RequestResult(ok=False, start=start - t_run0, input_len=item.input_len,
                        expected_output_len=item.output_len)
    first: float | None = None
    first_chunk: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream(
            "POST", target.url + target.path, json=target.body(item.prompt, item.output_len, stream=True),
            headers=target.headers,
        ) as resp:
            if resp.status_code != 200:
                res.error = _error_message(resp.status_code, (await resp.aread()).decode("utf-8", "replace"))
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    res.error = f"bad SSE data: {data[:100]}"
                    return res
                if obj.get("error"):
                    err = obj["error"]
                    res.error = "stream error: " + (err.get("message", str(err)) if isinstance(err, dict)
                                                    else str(err))
                    return res
                now = time.perf_counter()
                usage = obj.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens"):
                        res.input_len = int(usage["prompt_tokens"])
                for choice in obj.get("choices") or []:
                    if target.api == "chat":
                        text = (choice.get("delta") or {}).get("content")
                    else:
                        text = choice.get("text")
                    if first_chunk is None:
                        first_chunk = now
                    if text:
                        chunks += 1
                        if first is None:
                            first = now
    except (httpx.HTTPError, OSError) as exc:
        res.error = _describe_http_error(exc)
        return res
    end = time.perf_counter()
    first = first if first is not None else first_chunk
    if first is None:
        res.error = "no output in the response"
        return res
    res.ok = True
    res.output_len = usage_tokens if usage_tokens is not None else chunks
    res.ttft = first - start
    res.e2e = end - start
    if res.output_len > 1:
        res.tpot = (res.e2e - res.ttft) / (res.output_len - 1)
    return res


async def run_load(
    target: Target,
    items: Sequence[WorkItem],
    *,
    label: str = "bench",
    max_concurrency: int | None = None,
    progress: bool = True,
    progress_interval: float = 10.0,
) -> tuple[list[RequestResult], float]:
    """Send `items` at their times; returns results (in schedule order) and the wall time from the first
    send to the last completion."""
    import httpx

    bar = Progress(len(items), label, enabled=progress, interval=progress_interval)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results: list[RequestResult | None] = [None] * len(items)
    async with httpx.AsyncClient(timeout=httpx.Timeout(target.timeout, connect=10.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, item: WorkItem) -> None:
            if sem is not None:
                async with sem:
                    r = await send_request(client, target, item, t0)
            else:
                r = await send_request(client, target, item, t0)
            results[i] = r
            bar.update(r.ok)

        tasks = []
        for i, item in enumerate(items):
            delay = item.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, item)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    bar.close()
    return [r for r in results if r is not None], wall


async def probe(url: str, model: str | None, api_key: str | None, timeout: float = 10.0) -> list[str]:
    """GET {url}/models; returns the served model ids. Raises ConnectionError with a one-line reason."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(url + "/models", headers=headers)
    except (httpx.HTTPError, OSError) as exc:
        raise ConnectionError(f"cannot reach {url}: {_describe_http_error(exc)}") from None
    if r.status_code != 200:
        raise ConnectionError(f"{url}/models answered {_error_message(r.status_code, r.text)}")
    try:
        return [m["id"] for m in r.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConnectionError(f"{url}/models did not answer an OpenAI model list") from None


async def calibrate(target: Target, rng: random.Random, n_words: int = 200) -> float:
    """Tokens per word of the endpoint's tokenizer, from one non-streaming request's usage.prompt_tokens."""
    import httpx

    prompt = PromptMaker(1.0).make(n_words, rng)
    body = target.body(prompt, 1, stream=False)
    try:
        async with httpx.AsyncClient(timeout=target.timeout) as client:
            r = await client.post(target.url + target.path, json=body, headers=target.headers)
    except (httpx.HTTPError, OSError) as exc:
        raise ConnectionError(f"calibration request to {target.url} failed: {_describe_http_error(exc)}") from None
    if r.status_code != 200:
        raise ConnectionError(f"calibration request failed: {_error_message(r.status_code, r.text)}")
    try:
        n_tokens = int(r.json()["usage"]["prompt_tokens"])
    except (ValueError, KeyError, TypeError):
        return 1.3  # no usage: a typical English BPE ratio
    if target.api == "chat":  # subtract the chat template's overhead, measured with a one-word prompt
        with contextlib.suppress(Exception):  # keep the rough ratio
            async with httpx.AsyncClient(timeout=target.timeout) as client:
                r1 = await client.post(target.url + target.path, json=target.body("the", 1, stream=False),
                                       headers=target.headers)
            n_tokens -= int(r1.json()["usage"]["prompt_tokens"]) - 1
    return max(n_tokens, 1) / n_words


# ------------------------------------------------------------------------------------------ CLI


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="replay a workload against an OpenAI endpoint: TTFT/TPOT, throughput, SLO attainment, goodput",
        description="Send streaming requests with Poisson arrivals (or a JSONL trace) to any "
        "OpenAI-compatible endpoint and report TTFT/TPOT percentiles, throughput, SLO attainment and "
        "goodput (the highest rate at which --attainment of requests meet both SLOs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="lengths: N | uniform:LO:HI | lognormal:MEAN:SD (tokens)\n"
        "example: baton bench --url http://127.0.0.1:8080/v1 --rate 1,2,4 --num-requests 50 "
        "--input-len uniform:512:1024 --output-len 32 --slo-ttft 500ms --slo-tpot 50ms",
    )
    p.add_argument("--url", required=True, help="base URL of the OpenAI API, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--rate", default=None,
                   help="request rate(s) in req/s; a comma list sweeps them (default 1; inf = all at once)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 100 "
                   "unless --duration is given)")
    p.add_argument("--duration", default=None, help="stop sending after this long per rate (e.g. 60s)")
    p.add_argument("--input-len", default="256", help="prompt length distribution in tokens (default 256)")
    p.add_argument("--output-len", default="64", help="output length distribution in tokens (default 64)")
    p.add_argument("--max-input-len", type=int, default=None,
                   help="clip sampled prompt lengths to this many tokens (e.g. the context length minus outputs)")
    p.add_argument("--trace", default=None, help="JSONL trace: {timestamp, prompt|input_len, output_len}")
    p.add_argument("--tokens-per-word", type=float, default=None,
                   help="skip the calibration request and assume this many prompt tokens per word")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (outputs may then be shorter than asked)")
    p.add_argument("--slo-ttft", default=None, help="TTFT target, e.g. 500ms")
    p.add_argument("--slo-tpot", default=None, help="TPOT target, e.g. 50ms")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet both SLOs for a rate to count (default 0.9)")
    p.add_argument("--goodput-search", action="store_true",
                   help="after the sweep, bisect between the highest passing and lowest failing rate")
    p.add_argument("--search-steps", type=int, default=3, help="bisection steps for --goodput-search")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--request-timeout", default="300s", help="per-request timeout (default 300s)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (one by one) before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write all results (summaries and per request) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from baton.cli import CommandError

    try:
        return _run_bench(args)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except ConnectionError as exc:
        raise CommandError(str(exc)) from None


def _run_bench(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")
    rates = parse_rates(args.rate) if args.rate is not None else None
    if args.trace is None and rates is None:
        rates = [1.0]
    duration = parse_duration(args.duration, flag="--duration") if args.duration else None
    num = args.num_requests
    if num is not None and num < 1:
        raise ValueError("--num-requests must be at least 1")
    if num is None and duration is None and args.trace is None:
        num = 100
    if rates and any(math.isinf(r) for r in rates) and num is None:
        raise ValueError("--rate inf needs --num-requests")
    slo_ttft = parse_duration(args.slo_ttft, flag="--slo-ttft") if args.slo_ttft else None
    slo_tpot = parse_duration(args.slo_tpot, flag="--slo-tpot") if args.slo_tpot else None
    if not 0 < args.attainment <= 1:
        raise ValueError("--attainment must be in (0, 1]")
    if args.goodput_search and (slo_ttft is None and slo_tpot is None):
        raise ValueError("--goodput-search needs --slo-ttft and/or --slo-tpot")
    if args.goodput_search and args.trace is not None and rates is None:
        raise ValueError("--goodput-search with --trace needs --rate (the trace is rescaled to each rate)")
    input_len = LengthDist.parse(args.input_len, flag="--input-len")
    if args.max_input_len is not None:
        if args.max_input_len < 1:
            raise ValueError("--max-input-len must be at least 1")
        input_len = dataclasses.replace(input_len, maximum=args.max_input_len)
    output_len = LengthDist.parse(args.output_len, flag="--output-len")
    trace = load_trace(args.trace) if args.trace else None
    timeout = parse_duration(args.request_timeout, flag="--request-timeout")
    quiet = args.quiet
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    models = asyncio.run(probe(url, args.model, args.api_key))
    model = args.model
    if model is None:
        if not models:
            raise ValueError(f"{url}/models lists no model; pass --model")
        model = models[0]
    elif models and model not in models:
        raise ValueError(f"model {model!r} is not served at {url} (it serves: {', '.join(models)})")
    target = Target(url=url, model=model, api=args.api, ignore_eos=args.ignore_eos, timeout=timeout,
                    api_key=args.api_key)
    rng = random.Random(args.seed)
    if args.tokens_per_word:
        tpw = args.tokens_per_word
    else:
        tpw = asyncio.run(calibrate(target, rng))
    maker = PromptMaker(tpw)
    log(f"baton bench: {url} model {model}; {tpw:.2f} prompt tokens per word")
    for i in range(max(0, args.warmup)):
        item = WorkItem(0.0, maker.make(int(input_len.mean), rng), int(input_len.mean), 4)
        asyncio.run(run_load(target, [item], progress=False))

    runs: list[dict[str, Any]] = []

    def evaluate(rate: float | None) -> float:
        if trace is not None:
            items = trace_schedule(trace, maker, random.Random(args.seed + 2), rate=rate, num_requests=num,
                                   duration=duration)
        else:
            items = synthetic_schedule(rate, input_len, output_len, maker, args.seed, num_requests=num,
                                       duration=duration)
        if not items:
            raise ValueError("the workload is empty (check --duration / --num-requests)")
        label = f"rate {fmt_rate(rate)}" if rate is not None else "trace"
        results, wall = asyncio.run(run_load(target, items, label=label, max_concurrency=args.max_concurrency,
                                             progress=not quiet))
        s = summarize(results, wall, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
        print(format_summary(fmt_rate(rate) if rate is not None else "trace", s), flush=True)
        runs.append({"rate": _json_rate(rate),
                     "summary": s, "requests": [asdict(r) for r in results]})
        return s["slo_attainment"] if s["slo_attainment"] is not None else 0.0

    goodput: dict[str, Any] | None = None
    if rates is None:  # a trace replayed as recorded
        evaluate(None)
    else:
        has_slo = slo_ttft is not None or slo_tpot is not None
        sr = goodput_search(evaluate, rates, args.attainment, steps=args.search_steps,
                            search=args.goodput_search)
        if has_slo:
            goodput = {"goodput_rps": sr.goodput, "attainment_target": args.attainment,
                       "searched": bool(args.goodput_search),
                       "points": [{"rate": _json_rate(r), "attainment": a} for r, a in sorted(sr.points)],
                       "bracket": [_json_rate(r) for r in sr.bracket]}
            pts = ", ".join(f"{fmt_rate(r)}: {100 * a:.0f}%" for r, a in sorted(sr.points))
            print(f"attainment by rate (req/s): {pts}")
            if sr.goodput is None:
                print(f"goodput: below {fmt_rate(min(r for r, _ in sr.points))} req/s "
                      f"(no measured rate has >= {100 * args.attainment:.0f}% of requests within both SLOs)")
            else:
                upper = (f"; first failing rate {fmt_rate(sr.bracket[1])} req/s"
                         if sr.bracket[1] is not None else "; every measured rate passed (a lower bound)")
                print(f"goodput: {fmt_rate(sr.goodput)} req/s at >= {100 * args.attainment:.0f}% SLO attainment"
                      + upper)
            passing_above = [r for r, a in sr.points if a >= args.attainment and sr.goodput is not None
                             and r > sr.goodput]
            if sr.goodput is None:
                passing_above = [r for r, a in sr.points if a >= args.attainment]
            if passing_above:
                print(f"note: rate(s) {', '.join(fmt_rate(r) for r in sorted(passing_above))} also passed above a "
                      "failing rate (noisy measurement?)")
    if args.output:
        report = {
            "url": url, "model": model, "api": args.api, "tokens_per_word": tpw,
            "workload": {"trace": args.trace, "input_len": str(input_len), "output_len": str(output_len),
                         "num_requests": num, "duration_s": duration, "seed": args.seed,
                         "ignore_eos": args.ignore_eos},
            "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "attainment": args.attainment},
            "runs": runs, "goodput": goodput,
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.output}")
    return 0
