"""The router's Prometheus metrics, in their own registry (several routers can live in one process).

TTFT and TPOT are measured as the client sees them, which makes them the SLO signals (docs/architecture.md):
- TTFT (`baton_router_ttft_seconds`): request arrival at the router -> the first event carrying content written
  to the client, so the prefill hop, the KV hand-off and the decode worker's first token are all inside it; one
  observation per request. For a non-streaming request the client sees every token at once, so its TTFT is its
  whole latency and no TPOT is observed (SLO tracking expects streaming clients, as chat front-ends are). Bucketed
  exactly as vLLM's `vllm:time_to_first_token_seconds` (`launch.VLLM_TTFT_BUCKETS`), but not named like it: the
  workers export that name per hop, and a shared Prometheus would count each request again (README, "The
  router's TTFT").
- TPOT: (e2e - TTFT) / (tokens - 1), observed when a streamed request generated at least 2 tokens; tokens
  come from the stream's usage chunk when the client asked for it, else from the content events.
- TTFT stages (`stages.py`): each request's TTFT split into prefill_queue, prefill_compute, kv_handoff and
  first_decode from the workers' Server-Timing; one observation per reported stage, adding up to the TTFT.
- Prefill failures (`prefill_failure.py`): one count per request whose prefill failed, by what followed
  (retried_ok, recomputed, rejected).
- KV pairing (`pairing.py`): decode hops sent with a prefill worker's KV, by how the two workers' KV-layout
  fingerprints compared (`match`: same, unknown, cross -- cross stays 0), and requests recomputed on a decode
  worker because no decode worker's layout matched a prefill worker's.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from baton.launch import (
    KV_HANDOFF_MATCHES,
    PREFILL_FAILURE_OUTCOMES,
    TTFT_STAGES,
    VLLM_TTFT_BUCKETS,
    Label,
    Metric,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: rejected: a prefill failure answered 503 + Retry-After by the prefill-failure policy
OUTCOMES = ("ok", "fallback_recompute", "error", "cancelled", "overloaded", "rejected")

#: vLLM's TTFT buckets (1 ms .. 2560 s), so vLLM dashboards' TTFT panels read the router's histogram as they are
TTFT_BUCKETS = VLLM_TTFT_BUCKETS
# fmt: off
#: A stage can be far below a millisecond (an idle queue), or most of a slow TTFT; finer than vLLM's TTFT buckets
#: between 0.1 and 3 s, where the autoscaler compares prefill's stages with its share of the TTFT budget.
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)
#: From 1 ms to seconds per token; dense around typical 20-100 ms SLOs.
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    120.0, 300.0,
)
# fmt: on


class RouterMetrics:
    def __init__(self, llmservice: str | None = None, namespace: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {
            "llmservice": llmservice if llmservice is not None else os.environ.get("BATON_LLMSERVICE", ""),
            "namespace": namespace if namespace is not None else os.environ.get("BATON_NAMESPACE", ""),
        }
        base = list(self.labels)
        r = self.registry
        self.ttft = Histogram(
            Metric.ROUTER_TTFT,
            "Time to first token as the client sees it, end to end (KV hand-off included): arrival at the router to "
            "the first content sent. Buckets as vllm:time_to_first_token_seconds.",
            base, buckets=TTFT_BUCKETS, registry=r,
        ).labels(**self.labels)
        self.tpot = Histogram(
            Metric.ROUTER_TPOT,
            "Time per output token after the first, as the client sees it: (e2e - ttft) / (tokens - 1).",
            base, buckets=TPOT_BUCKETS, registry=r,
        ).labels(**self.labels)
        self.e2e = Histogram(
            "baton_router_e2e_request_latency_seconds",
            "Arrival at the router to the last byte sent, for requests that completed.",
            base, buckets=E2E_BUCKETS, registry=r,
        ).labels(**self.labels)
        requests = Counter(
            "baton_router_requests", "Requests by outcome.", base + ["outcome"], registry=r
        )
        self.requests = {o: requests.labels(**self.labels, outcome=o) for o in OUTCOMES}
        self._inflight = Gauge(
            "baton_router_inflight",
            "Requests this router has in flight at a worker.",
            base + ["role", "endpoint"], registry=r,
        )
        self.retries = Counter(
            "baton_router_retries", "Hops sent again (same X-Request-Id) before any byte reached the client.",
            base + ["role"], registry=r,
        )
        self.hop_errors = Counter(
            "baton_router_hop_errors", "Failed hops to workers, by role and reason.",
            base + ["role", "reason"], registry=r,
        )
        stage = Histogram(
            Metric.ROUTER_TTFT_STAGE,
            "TTFT split into stages (prefill_queue, prefill_compute, kv_handoff, first_decode) from the workers' "
            "Server-Timing; the stages of one request add up to its TTFT. Stages a worker does not report (vLLM) "
            "are not observed.",
            base + [Label.STAGE], buckets=STAGE_BUCKETS, registry=r,
        )
        self.stages = {s: stage.labels(**self.labels, stage=s) for s in TTFT_STAGES}
        failures = Counter(
            Metric.ROUTER_PREFILL_FAILURES,
            "Requests whose prefill hop failed (or found no healthy prefill worker), by what the router did: "
            "retried_ok (another prefill worker), recomputed (on the decode worker), rejected (503).",
            base + [Label.OUTCOME], registry=r,
        )
        self.prefill_failures = {o: failures.labels(**self.labels, outcome=o) for o in PREFILL_FAILURE_OUTCOMES}
        handoffs = Counter(
            Metric.ROUTER_KV_HANDOFFS,
            "Decode hops sent with a prefill worker's kv_transfer_params, by how the two workers' KV-layout "
            "fingerprints compared: same, unknown (a worker reports none, e.g. vLLM), cross (never, while pairing "
            "works).",
            base + [Label.MATCH], registry=r,
        )
        self.kv_handoffs = {m: handoffs.labels(**self.labels, match=m) for m in KV_HANDOFF_MATCHES}
        self.layout_mismatch = Counter(
            Metric.ROUTER_LAYOUT_MISMATCH,
            "Requests recomputed on a decode worker because no healthy decode worker's KV layout matched the "
            "prefill workers' (a rollout that changes the layout, caught between old and new workers).",
            base, registry=r,
        ).labels(**self.labels)
        self._gauges: dict[tuple[str, str], object] = {}

    def outcome(self, outcome: str) -> None:
        self.requests[outcome].inc()

    def set_inflight(self, role: str, endpoint: str, value: int) -> None:
        g = self._gauges.get((role, endpoint))
        if g is None:
            g = self._gauges[(role, endpoint)] = self._inflight.labels(
                **self.labels, role=role, endpoint=endpoint
            )
        g.set(value)

    def forget(self, role: str, endpoint: str) -> None:
        if self._gauges.pop((role, endpoint), None) is not None:
            try:
                self._inflight.remove(self.labels["llmservice"], self.labels["namespace"], role, endpoint)
            except KeyError:
                pass

    def observe_stages(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.stages[stage].observe(seconds)

    def prefill_failure(self, outcome: str) -> None:
        self.prefill_failures[outcome].inc()

    def kv_handoff(self, match: str) -> None:
        self.kv_handoffs[match].inc()

    def retry(self, role: str) -> None:
        self.retries.labels(**self.labels, role=role).inc()

    def hop_error(self, role: str, reason: str) -> None:
        self.hop_errors.labels(**self.labels, role=role, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
