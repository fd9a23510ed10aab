"""The autoscaler's metrics source: instant queries against the Prometheus HTTP API (`/api/v1/query`).

Everything an autoscaler tick needs about one LLMService is read by `PrometheusSource.observe` in one round of
concurrent queries. Series are selected by the labels every Baton metric carries (docs/architecture.md, Metrics):
`llmservice="<name>", namespace="<namespace>"` (scrape them with `honor_labels: true` / `honorLabels: true`,
or Prometheus renames a clashing `namespace` target label to `exported_namespace`).

The queries, with `S` = `llmservice="<name>",namespace="<namespace>"` and `W` = the window (e.g. `1m`):

* TTFT p90, as the client sees it at the router:
  `histogram_quantile(0.9, sum by (le) (rate(baton_router_ttft_seconds_bucket{S}[W])))`
* TPOT p90 at the router (one observation per request: its mean time per output token):
  `histogram_quantile(0.9, sum by (le) (rate(baton_router_tpot_seconds_bucket{S}[W])))`
* Share of requests within each SLO, from the same histogram's buckets:
  `sum by (le) (rate(baton_router_ttft_seconds_bucket{S}[W]))` (and `..._tpot_...`); the share is
  rate(bucket `le` = B) / rate(bucket `le` = +Inf), where B is the largest bucket bound <= the SLO. That
  counts only requests *known* to meet the SLO, so it errs on the side of "not met" (exact when the SLO is a
  bucket bound; an SLO below the smallest bound gives 0). The `+Inf` bucket's rate is the request rate.
* Attainment (share of requests meeting *both* SLOs): the two histograms are separate, so the joint share
  is not observable; it is estimated as the product of the two shares, which is exact when TTFT and TPOT
  misses are independent (they come from different pools: prefill vs decode) and is never above either
  share. Both shares are reported too.
* When the router has no data (no router series, or no requests through it in the window), the workers'
  histograms are used instead, by role: TTFT from `vllm:time_to_first_token_seconds_bucket{S,role=~"prefill|both"}`
  (the prefill worker's first token: excludes the router hop) and TPOT from
  `vllm:inter_token_latency_seconds_bucket{S,role=~"decode|both"}` (per token, not per request: a p90 of
  inter-token gaps, close to but not the same as a p90 of per-request TPOT). The source is reported.
* TTFT by stage at the router (the prefill autoscaler's own share of TTFT; `stage` is one of
  `baton.launch.TTFT_STAGES`: prefill_queue, prefill_compute, kv_handoff, first_decode), p90 per stage:
  `histogram_quantile(0.9, sum by (le, stage) (rate(baton_router_ttft_stage_seconds_bucket{S}[W])))`.
  A stage without requests in the window (NaN) or a router without the histogram reads as no data.
* Load per role (one query each, `sum by (role)` / `avg by (role)` over the role's pods):
  queue `sum by (role) (vllm:num_requests_waiting{S})`, running `sum by (role) (vllm:num_requests_running{S})`,
  KV cache usage `avg by (role) (vllm:kv_cache_usage_perc{S})`, prompt throughput
  `sum by (role) (rate(vllm:prompt_tokens_total{S}[W]))`, generation throughput
  `sum by (role) (rate(vllm:generation_tokens_total{S}[W]))`, busy time (Baton workers: seconds in forward
  steps) summed `sum by (role) (rate(baton_engine_busy_seconds_total{S}[W]))` and per pod
  `avg by (role) (rate(baton_engine_busy_seconds_total{S}[W]))` (the busy share, 0..1). Prompt tokens per busy
  second is a prefill replica's capacity (`autoscaler.prefill_capacity`); vLLM workers export no busy time.

Metric names with colons (`vllm:...`) are valid PromQL identifiers as they are (`[a-zA-Z_:][a-zA-Z0-9_:]*`;
colons are reserved for recording rules by convention only). But the name Prometheus *stores* depends on the
exposition: recent prometheus_client (0.26 here) answers a Prometheus 2.x scrape through its
content-negotiating apps (`start_http_server`, `make_asgi_app`, which vLLM mounts) in OpenMetrics with
`escaping=underscores`, because 2.x does not ask for `escaping=allow-utf-8`, and that turns
`vllm:num_requests_waiting` into `vllm_num_requests_waiting`; Baton's worker serves the plain text format and
keeps the colon. So every worker metric is selected as `{__name__=~"vllm[:_]num_requests_waiting",S}` (both
spellings), e.g. `sum by (role) ({__name__=~"vllm[:_]num_requests_waiting",S})`; the tests run these exact
queries against a real Prometheus 2.42 with both kinds of exporter.

A result of NaN (0/0: no requests in the window) or no series at all reads as None ("no data").
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
from baton.operator.units import format_duration, parse_duration

from baton.launch import TTFT_STAGES, Label, Metric

QUANTILE = 0.9
ROUTER_TTFT = Metric.ROUTER_TTFT
ROUTER_TPOT = Metric.ROUTER_TPOT
WORKER_TTFT = Metric.TTFT
WORKER_TPOT = Metric.INTER_TOKEN_LATENCY
ROUTER_TTFT_STAGE = Metric.ROUTER_TTFT_STAGE
#: a Baton decode worker's KV imports (worker/metrics.py): a counter of bytes and a histogram of seconds
KV_TRANSFER_BYTES = "baton_kv_transfer_bytes_total"
KV_TRANSFER_SECONDS = "baton_kv_transfer_seconds"
#: The router's TTFT stages, in time order: the first two are prefill's to fix, the others are not.
PREFILL_QUEUE, PREFILL_COMPUTE, KV_HANDOFF, FIRST_DECODE = TTFT_STAGES
#: Worker roles whose histograms stand in for the router's (role `both` serves the whole request).
WORKER_TTFT_ROLES = "prefill|both"
WORKER_TPOT_ROLES = "decode|both"


class PrometheusError(Exception):
    """Prometheus could not answer a query."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class PrometheusUnavailable(PrometheusError):
    """Prometheus could not be reached (refused, timeout, DNS, 5xx) after the retries."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(url, f"Prometheus at {url} is unavailable: {cause}")
        self.cause = cause


class PrometheusQueryError(PrometheusError):
    """Prometheus answered, but refused the query (bad PromQL, 4xx) or sent something that is not its API."""

    def __init__(self, url: str, query: str, detail: str) -> None:
        super().__init__(url, f"Prometheus at {url} refused query {query!r}: {detail}")
        self.query, self.detail = query, detail


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


def _float(text: Any) -> float:
    # Prometheus sends numbers as strings: "0.25", "NaN", "+Inf", "-Inf".
    return float(text)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def selector(name: str, namespace: str, **extra: str) -> str:
    """`llmservice="name",namespace="ns"` plus `extra` (a value starting with `~` is a regex match)."""
    parts = [f'llmservice="{_label_value(name)}"', f'namespace="{_label_value(namespace)}"']
    for key, value in extra.items():
        if value.startswith("~"):
            parts.append(f'{key}=~"{_label_value(value[1:])}"')
        else:
            parts.append(f'{key}="{_label_value(value)}"')
    return ",".join(parts)


def series(metric: str, sel: str) -> str:
    """A series selector for `metric` with label matchers `sel`; a colon in the name matches `:` or `_`
    (see the module docstring: the stored name depends on the exporter's exposition format)."""
    if ":" not in metric:
        return f"{metric}{{{sel}}}"
    return f'{{__name__=~"{metric.replace(":", "[:_]")}",{sel}}}'


def prom_duration(seconds: float) -> str:
    """A PromQL range duration (`1m`, `30s`, `1500ms`): whole milliseconds, no fractions."""
    ms = max(1, round(seconds * 1000))
    if ms % 60000 == 0:
        return f"{ms // 60000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


class PrometheusClient:
    """Instant queries with a per-request timeout and retries with exponential backoff.

    Connection failures, timeouts and 5xx answers are retried (`retries` extra attempts, sleeping `backoff`,
    2*`backoff`, ...), then raised as `PrometheusUnavailable` naming the URL and the last cause. A query
    Prometheus refuses (4xx, `status: error`) is not retried: `PrometheusQueryError`.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 2, backoff: float = 0.25,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), transport=transport,
                                       headers={"Accept": "application/json"})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def query(self, promql: str) -> list[Sample]:
        """Evaluate `promql` now; a vector's samples, or one unlabelled sample for a scalar."""
        endpoint = f"{self.url}/api/v1/query"
        cause = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = await self._http.post(endpoint, data={"query": promql})
            except httpx.TimeoutException:
                cause = f"no answer within {self.timeout:g}s"
                continue
            except httpx.HTTPError as exc:  # refused, reset, DNS, TLS
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status_code >= 500 or response.status_code == 429:
                cause = f"HTTP {response.status_code} {response.reason_phrase}".strip()
                continue
            if response.status_code >= 400:
                raise PrometheusQueryError(self.url, promql, _api_error(response)
                                           or f"HTTP {response.status_code} {response.reason_phrase}")
            return _parse(self.url, promql, response)
        raise PrometheusUnavailable(self.url, f"{cause} (after {self.retries + 1} attempts)")

    async def value(self, promql: str) -> float | None:
        """The single value of a query that aggregates to one series; None for no series or NaN."""
        samples = await self.query(promql)
        if not samples:
            return None
        v = samples[0].value
        return None if math.isnan(v) else v

    async def by_label(self, promql: str, label: str) -> dict[str, float]:
        """Samples keyed by one label's value (NaN dropped)."""
        return {s.labels.get(label, ""): s.value for s in await self.query(promql) if not math.isnan(s.value)}


def _api_error(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") == "error":
        return f"{body.get('errorType', 'error')}: {body.get('error', '')}"
    return None


def _parse(url: str, promql: str, response: httpx.Response) -> list[Sample]:
    try:
        body = response.json()
    except ValueError:
        raise PrometheusQueryError(url, promql, f"answer is not JSON (is {url} a Prometheus?): "
                                   f"{response.text[:200]!r}") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise PrometheusQueryError(url, promql, _api_error(response) or f"unexpected answer {str(body)[:200]}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "vector":
            return [Sample(dict(item.get("metric") or {}), _float(item["value"][1])) for item in result or []]
        if kind == "scalar":
            return [Sample({}, _float(result[1]))]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PrometheusQueryError(url, promql, f"malformed {kind} result: {exc}") from None
    raise PrometheusQueryError(url, promql, f"expected an instant vector or scalar, got {kind!r}")


# ------------------------------------------------------------------------------------------ observations


@dataclass(frozen=True)
class LatencySignal:
    """One latency SLO signal over the window."""

    p90: float | None = None  # seconds; None: no requests in the window
    within_slo: float | None = None  # share of requests at or below the SLO's bucket bound
    bound: float | None = None  # the bucket bound used for `within_slo` (largest bound <= the SLO)
    requests_per_second: float | None = None
    source: str = "none"  # "router", "workers" or "none"


@dataclass(frozen=True)
class RoleLoad:
    """Aggregates over one role's workers (None: no such series)."""

    waiting: float | None = None  # sum of vllm:num_requests_waiting
    running: float | None = None  # sum of vllm:num_requests_running
    kv_cache_usage: float | None = None  # mean of vllm:kv_cache_usage_perc (0..1)
    prompt_tokens_per_second: float | None = None
    generation_tokens_per_second: float | None = None
    busy_seconds_per_second: float | None = None  # sum over the role's pods of busy seconds per second
    busy_fraction: float | None = None  # mean over the role's pods of the busy share (0..1)


@dataclass(frozen=True)
class ServiceMetrics:
    """What Prometheus says about one LLMService over `window` seconds."""

    window: float
    ttft: LatencySignal = field(default_factory=LatencySignal)
    tpot: LatencySignal = field(default_factory=LatencySignal)
    attainment: float | None = None  # estimated share meeting both SLOs (see module docstring)
    roles: dict[str, RoleLoad] = field(default_factory=dict)
    #: p90 seconds of each TTFT stage at the router (keys: TTFT_STAGES); a stage without data is absent
    ttft_stages: dict[str, float] = field(default_factory=dict)

    @property
    def window_text(self) -> str:
        return format_duration(self.window)


def within_bound(buckets: dict[str, float], slo: float) -> tuple[float | None, float | None, float | None]:
    """(share of observations at or below the largest bucket bound <= `slo`, that bound, total rate).

    `buckets` maps `le` label values (as Prometheus sends them: "0.5", "1.0", "+Inf") to rates. The share is
    None when the total is zero or missing (no requests); a `slo` below every bound gives share 0.
    """
    parsed: list[tuple[float, float]] = []
    for le, rate in buckets.items():
        try:
            parsed.append((_float(le), rate))
        except ValueError:
            continue
    total = next((rate for le, rate in parsed if math.isinf(le) and le > 0), None)
    if total is None or not total > 0:
        return None, None, total
    finite = sorted((le, rate) for le, rate in parsed if math.isfinite(le) and le <= slo * (1 + 1e-9))
    if not finite:
        return 0.0, None, total
    bound, rate = finite[-1]
    return max(0.0, min(1.0, rate / total)), bound, total


class PrometheusSource:
    """The autoscaler's view of an LLMService through Prometheus (queries: see the module docstring)."""

    def __init__(self, client: PrometheusClient, window: float | str = 60.0) -> None:
        self.client = client
        self.window = parse_duration(window) if isinstance(window, str) else float(window)

    @property
    def url(self) -> str:
        return self.client.url

    def queries(self, name: str, namespace: str) -> dict[str, str]:
        """Every query `observe` may run, by purpose (documentation and tests)."""
        w = prom_duration(self.window)
        s = selector(name, namespace)
        out = {}
        for signal, router, worker, roles in (("ttft", ROUTER_TTFT, WORKER_TTFT, WORKER_TTFT_ROLES),
                                              ("tpot", ROUTER_TPOT, WORKER_TPOT, WORKER_TPOT_ROLES)):
            for source, metric, sel in (("router", router, s),
                                        ("workers", worker, selector(name, namespace, role="~" + roles))):
                buckets = f"sum by (le) (rate({series(metric + '_bucket', sel)}[{w}]))"
                out[f"{signal}_{source}_p90"] = f"histogram_quantile({QUANTILE}, {buckets})"
                out[f"{signal}_{source}_buckets"] = buckets
        out["ttft_stages_p90"] = (f"histogram_quantile({QUANTILE}, sum by (le, {Label.STAGE}) "
                                  f"(rate({series(ROUTER_TTFT_STAGE + '_bucket', s)}[{w}])))")
        out["waiting"] = f"sum by (role) ({series(Metric.NUM_REQUESTS_WAITING, s)})"
        out["running"] = f"sum by (role) ({series(Metric.NUM_REQUESTS_RUNNING, s)})"
        out["kv_cache_usage"] = f"avg by (role) ({series(Metric.KV_CACHE_USAGE, s)})"
        out["prompt_tokens_per_second"] = f"sum by (role) (rate({series(Metric.PROMPT_TOKENS + '_total', s)}[{w}]))"
        out["generation_tokens_per_second"] = (
            f"sum by (role) (rate({series(Metric.GENERATION_TOKENS + '_total', s)}[{w}]))")
        busy = f"rate({series(Metric.ENGINE_BUSY_SECONDS + '_total', s)}[{w}])"
        out["busy_seconds_per_second"] = f"sum by (role) ({busy})"
        out["busy_fraction"] = f"avg by (role) ({busy})"
        return out

    def workload_queries(self, name: str, namespace: str, window: float) -> dict[str, str]:
        """The planner's queries: request rate, and mean and p90 of the request length histograms."""
        w = prom_duration(window)
        s = selector(name, namespace)
        out = {"rate_router": f"sum(rate({series(ROUTER_TTFT + '_count', s)}[{w}]))"}
        # a decode-only fleet (prefill replicas 0: an applied colocated plan) has no prefill worker; its decode
        # workers compute the prompts and count their lengths
        for key, metric, roles in (("input", Metric.REQUEST_PROMPT_TOKENS, WORKER_TTFT_ROLES),
                                   ("input_decode_only", Metric.REQUEST_PROMPT_TOKENS, "decode"),
                                   ("output", Metric.REQUEST_GENERATION_TOKENS, WORKER_TPOT_ROLES)):
            sel = selector(name, namespace, role="~" + roles)
            count = f"sum(rate({series(metric + '_count', sel)}[{w}]))"
            out[f"{key}_count"] = count
            out[f"{key}_mean"] = f"sum(rate({series(metric + '_sum', sel)}[{w}])) / {count}"
            out[f"{key}_p90"] = (f"histogram_quantile({QUANTILE}, sum by (le) "
                                 f"(rate({series(metric + '_bucket', sel)}[{w}])))")
        # the KV hand-offs decode workers made (Baton workers export these): bytes and transfer-seconds per
        # second, and transfers per second; bytes / seconds is the link's effective bandwidth (planner/link.py)
        out["kv_bytes_per_s"] = f"sum(rate({series(KV_TRANSFER_BYTES, s)}[{w}]))"
        out["kv_seconds_per_s"] = f"sum(rate({series(KV_TRANSFER_SECONDS + '_sum', s)}[{w}]))"
        out["kv_transfers_per_s"] = f"sum(rate({series(KV_TRANSFER_SECONDS + '_count', s)}[{w}]))"
        return out

    async def workload(self, name: str, namespace: str, window: float) -> dict[str, float | None]:
        """The planner's numbers (None: no data): `rate` (router, else the prefill workers' request count),
        `input_mean`, `input_p90`, `output_mean`, `output_p90`, and the KV hand-offs `kv_bytes_per_s`,
        `kv_seconds_per_s`, `kv_transfers_per_s`. Raises `PrometheusError`."""
        q = self.workload_queries(name, namespace, window)
        keys = list(q)
        values = dict(zip(keys, await asyncio.gather(*(self.client.value(q[k]) for k in keys)), strict=True))
        if not values["input_count"]:  # no prefill (or both) worker counted a request: a decode-only fleet
            for k in ("count", "mean", "p90"):
                values[f"input_{k}"] = values[f"input_decode_only_{k}"]
        rate = values["rate_router"] if values["rate_router"] else values["input_count"]
        return {"rate": rate, "input_mean": values["input_mean"], "input_p90": values["input_p90"],
                "output_mean": values["output_mean"], "output_p90": values["output_p90"],
                **{k: values[k] for k in ("kv_bytes_per_s", "kv_seconds_per_s", "kv_transfers_per_s")}}

    async def _latency(self, q: dict[str, str], signal: str, slo: float) -> LatencySignal:
        for source in ("router", "workers"):
            buckets, p90 = await asyncio.gather(self.client.by_label(q[f"{signal}_{source}_buckets"], "le"),
                                                self.client.value(q[f"{signal}_{source}_p90"]))
            share, bound, total = within_bound(buckets, slo)
            if total:  # requests went through this source in the window
                return LatencySignal(p90=p90, within_slo=share, bound=bound, requests_per_second=total,
                                     source=source)
        return LatencySignal()

    async def observe(self, name: str, namespace: str, ttft_slo: float, tpot_slo: float) -> ServiceMetrics:
        """One consistent read of the service's SLO signals and per-role load; raises `PrometheusError`."""
        q = self.queries(name, namespace)
        load_keys = ("waiting", "running", "kv_cache_usage", "prompt_tokens_per_second",
                     "generation_tokens_per_second", "busy_seconds_per_second", "busy_fraction")
        results = await asyncio.gather(self._latency(q, "ttft", ttft_slo), self._latency(q, "tpot", tpot_slo),
                                       self.client.by_label(q["ttft_stages_p90"], Label.STAGE),
                                       *(self.client.by_label(q[k], "role") for k in load_keys),
                                       return_exceptions=True)
        for result in results:  # the first failure, preferring "unavailable" (it explains the others)
            if isinstance(result, PrometheusUnavailable):
                raise result
        for result in results:
            if isinstance(result, BaseException):
                raise result
        ttft, tpot, stages, *loads = results
        roles: dict[str, RoleLoad] = {}
        for role in sorted({r for load in loads for r in load}):
            roles[role] = RoleLoad(**{k: load.get(role) for k, load in zip(load_keys, loads)})
        attainment = (ttft.within_slo * tpot.within_slo
                      if ttft.within_slo is not None and tpot.within_slo is not None else None)
        return ServiceMetrics(window=self.window, ttft=ttft, tpot=tpot, attainment=attainment, roles=roles,
                              ttft_stages={k: v for k, v in stages.items() if k in TTFT_STAGES})
