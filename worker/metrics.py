"""Prometheus metrics of a worker, with vLLM's names and buckets so vLLM dashboards and Baton's autoscaler
read a Baton worker and a vLLM worker the same way (see docs/architecture.md, Metrics).

Every series carries `model_name` (as vLLM) plus Baton's `llmservice`, `namespace` and `role`. Request-level
histograms and token counters are recorded by the HTTP server as outputs stream; the engine's gauges
(running, waiting, KV usage) are read from `engine.stats()` at scrape time by a custom collector, so they are
never stale. Each `WorkerMetrics` owns its registry (never the global one), so several apps can live in one
process (tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from baton.worker.engine.types import EngineStats
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from baton.launch import LEASE_EXPIRED, LEASE_PULLED, VLLM_TTFT_BUCKETS, Label
from baton.launch import Metric as MetricName

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py).
# fmt: off
#: token counts, 1-2-5 steps as vLLM builds them for its request length histograms
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
#: the contract's copy of vLLM's TTFT buckets (the router's end-to-end TTFT uses it too)
TTFT_BUCKETS = VLLM_TTFT_BUCKETS
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)
# fmt: on

LABEL_NAMES = ("model_name", "llmservice", "namespace", "role")
FINISH_REASONS = ("stop", "length", "abort")


def resolve_labels(model_name: str, role: str, labels: dict | None = None) -> dict[str, str]:
    """The common labels: explicit `labels` win, then env BATON_LLMSERVICE / BATON_NAMESPACE, then ""."""
    labels = dict(labels or {})
    return {
        "model_name": str(labels.get("model_name") or model_name),
        "llmservice": str(labels.get("llmservice") or os.environ.get("BATON_LLMSERVICE", "")),
        "namespace": str(labels.get("namespace") or os.environ.get("BATON_NAMESPACE", "")),
        "role": str(labels.get("role") or role),
    }


class _EngineStatsCollector(Collector):
    """Engine gauges, read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], labels: dict[str, str]) -> None:
        self._stats = stats
        self._names = list(labels)
        self._values = [labels[k] for k in self._names]

    def describe(self) -> Iterable[Metric]:
        return []  # no describe-time engine call; names are unique by construction

    def collect(self) -> Iterable[Metric]:
        try:
            s = self._stats()
        except Exception:  # noqa: BLE001 - a scrape must never fail because the engine is gone
            return []
        out: list[Metric] = []

        def gauge(name: str, doc: str, value: float) -> None:
            g = GaugeMetricFamily(name, doc, labels=self._names)
            g.add_metric(self._values, float(value))
            out.append(g)

        gauge(MetricName.NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.", s.num_running)
        gauge(MetricName.NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", s.num_waiting)
        gauge(MetricName.KV_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        c = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", labels=self._names
        )
        c.add_metric(self._values, float(s.num_preemptions_total))
        out.append(c)
        c = CounterMetricFamily(
            MetricName.ENGINE_BUSY_SECONDS,
            "Seconds the engine spent running forward steps (its rate: the share of time the worker is busy).",
            labels=self._names,
        )
        c.add_metric(self._values, float(s.busy_seconds_total))
        out.append(c)
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_cache_queries_total),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_cache_hits_total),
        ):
            c = CounterMetricFamily(name, doc, labels=self._names)
            c.add_metric(self._values, float(value))
            out.append(c)
        out.extend(self._lease_metrics(s))
        out.extend(self._kv_metrics(s))
        return out

    def _lease_metrics(self, s: EngineStats) -> list[Metric]:
        """KV leases (prefill side): held now, and how they ended -- pulled by their decode worker, or expired
        (its prompt was recomputed). A drain waits for the gauge to reach 0; expired ones show a lost hand-off."""
        held = GaugeMetricFamily(
            MetricName.KV_LEASES, "KV caches held for a decode worker to pull (prefill role).", labels=self._names
        )
        held.add_metric(self._values, float(s.num_kv_leases))
        ended = CounterMetricFamily(
            MetricName.KV_LEASES_ENDED,
            "KV leases that ended, by outcome: pulled by the decode worker, or expired unpulled.",
            labels=self._names + [Label.OUTCOME],
        )
        ended.add_metric(self._values + [LEASE_PULLED], float(s.kv_leases_pulled_total))
        ended.add_metric(self._values + [LEASE_EXPIRED], float(s.kv_leases_expired_total))
        return [held, ended]

    def _kv_metrics(self, s: EngineStats) -> list[Metric]:
        """KV handoff (decode side imports): baton_kv_transfer_*, the transport actually in use, and the
        kv_transfer_params refused unsigned, altered or expired (`kv/params_auth.py`)."""
        names, values = self._names, self._values
        out: list[Metric] = []
        if s.kv_transport:
            info = GaugeMetricFamily(
                MetricName.KV_TRANSPORT_INFO,
                "KV transport actually moving the bytes (tcp, ucx-tcp, rdma, inprocess); value is always 1.",
                labels=names + [Label.TRANSPORT],
            )
            info.add_metric(values + [s.kv_transport], 1.0)
            out.append(info)
        h = HistogramMetricFamily(
            "baton_kv_transfer_seconds",
            "Time to import one request's KV cache from the prefill worker.",
            labels=names,
        )
        buckets = s.kv_transfer_seconds_buckets or ((float("inf"), s.kv_transfers_total),)
        h.add_metric(
            values,
            [("+Inf" if le == float("inf") else str(le), float(n)) for le, n in buckets],
            float(s.kv_transfer_seconds_total),
        )
        out.append(h)
        b = CounterMetricFamily(
            "baton_kv_transfer_bytes", "Bytes of KV cache imported from prefill workers.", labels=names
        )
        b.add_metric(values, float(s.kv_transfer_bytes_total))
        out.append(b)
        f = CounterMetricFamily(
            "baton_kv_transfer_failures",
            "KV imports that failed, by reason (auth, timeout, connection, integrity, lease, ...).",
            labels=names + ["reason"],
        )
        for reason, n in sorted((s.kv_transfer_failures or {}).items()):
            f.add_metric(values + [reason], float(n))
        out.append(f)
        r = CounterMetricFamily(
            "baton_kv_params_rejected",
            "kv_transfer_params refused before any KV connection, by reason (unsigned, bad_signature, expired): "
            "not handed out by a prefill worker of this service, altered, or past their lease.",
            labels=names + ["reason"],
        )
        for reason, n in sorted((getattr(s, "kv_params_rejected", None) or {}).items()):
            r.add_metric(values + [reason], float(n))
        out.append(r)
        return out


class WorkerMetrics:
    """The metrics of one worker app; `render()` is the /metrics body."""

    def __init__(
        self,
        *,
        model_name: str,
        role: str,
        stats: Callable[[], EngineStats],
        labels: dict | None = None,
        engine_kind: str = "baton",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.labels = resolve_labels(model_name, role, labels)
        names = list(LABEL_NAMES)
        values = [self.labels[k] for k in names]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(*values)

        self.ttft = hist(
            MetricName.TTFT, "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = hist(
            MetricName.INTER_TOKEN_LATENCY, "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        # The name vLLM used for the same observations before `inter_token_latency`; older dashboards read it.
        self.tpot = hist(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (same as inter-token latency).",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            MetricName.PROMPT_TOKENS, "Number of prefill tokens processed.", names, registry=r
        ).labels(*values)
        self.generation_tokens = Counter(
            MetricName.GENERATION_TOKENS, "Number of generation tokens processed.", names, registry=r
        ).labels(*values)
        # vLLM's per-request length histograms: the planner's workload basis
        self.request_prompt_tokens = hist(
            MetricName.REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.", LENGTH_BUCKETS)
        self.request_generation_tokens = hist(
            MetricName.REQUEST_GENERATION_TOKENS, "Number of generation tokens processed.", LENGTH_BUCKETS)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            names + ["finished_reason"],
            registry=r,
        )
        self.success = {reason: self._success.labels(*values, reason) for reason in FINISH_REASONS}
        info = Gauge(
            "baton_worker_info",
            "Information about this Baton worker (value is always 1).",
            names + ["engine"],
            registry=r,
        )
        info.labels(*values, engine_kind).set(1)
        r.register(_EngineStatsCollector(stats, self.labels))

    def request_finished(self, reason: str | None) -> None:
        reason = reason or "abort"
        if reason not in self.success:
            self.success[reason] = self._success.labels(*[self.labels[k] for k in LABEL_NAMES], reason)
        self.success[reason].inc()

    def tracker(self, arrival: float | None = None) -> RequestTracker:
        return RequestTracker(self, time.monotonic() if arrival is None else arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Records one request's timings and tokens as its outputs arrive."""

    def __init__(self, metrics: WorkerMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.last: float | None = None
        self.prompt_counted = False
        self.prompt_tokens = 0
        self.generated = 0
        self.done = False

    def on_output(self, num_new_tokens: int, num_prompt_tokens: int) -> None:
        now = time.monotonic()
        if not self.prompt_counted and num_prompt_tokens:
            self.m.prompt_tokens.inc(num_prompt_tokens)
            self.prompt_counted = True
            self.prompt_tokens = num_prompt_tokens
        if num_new_tokens <= 0:
            return
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            dt = now - self.last
            self.m.itl.observe(dt)
            self.m.tpot.observe(dt)
        self.last = now
        self.generated += num_new_tokens
        self.m.generation_tokens.inc(num_new_tokens)

    def on_finish(self, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.monotonic() - self.arrival)
        self.m.request_finished(reason)
        if self.prompt_tokens:
            self.m.request_prompt_tokens.observe(self.prompt_tokens)
            self.m.request_generation_tokens.observe(self.generated)
