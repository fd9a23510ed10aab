"""The worker's Prometheus metrics: vLLM's names, buckets and labels (docs/architecture.md, Metrics: a contract)."""

from __future__ import annotations

import pytest
from baton.worker.engine.types import EngineStats
from baton.worker.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, WorkerMetrics
from prometheus_client.parser import text_string_to_metric_families

from baton.launch import Metric

LABELS = {"model_name": "tiny", "llmservice": "chat", "namespace": "ml", "role": "prefill"}


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: WorkerMetrics, name: str, **extra) -> float:
    key = (name, tuple(sorted({**LABELS, **extra}.items())))
    return samples(metrics)[key]


@pytest.fixture
def metrics() -> WorkerMetrics:
    stats = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions_total=4,
                        busy_seconds_total=2.5)
    return WorkerMetrics(
        model_name="tiny",
        role="prefill",
        stats=lambda: stats,
        labels={"llmservice": "chat", "namespace": "ml"},
        engine_kind="baton",
    )


def test_vllm_names_and_labels(metrics: WorkerMetrics):
    text = metrics.render().decode()
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:num_preemptions_total",
        "baton_worker_info",
    ):
        assert f"\n{name}{{" in text, name
    assert value(metrics, "vllm:num_requests_running") == 3
    assert value(metrics, "vllm:num_requests_waiting") == 2
    assert value(metrics, "vllm:kv_cache_usage_perc") == 0.25
    assert value(metrics, "vllm:num_preemptions_total") == 4
    assert value(metrics, Metric.ENGINE_BUSY_SECONDS + "_total") == 2.5  # the autoscaler's prefill capacity
    assert value(metrics, "baton_worker_info", engine="baton") == 1
    for reason in ("stop", "length", "abort"):  # present from the start, so rate() works at once
        assert value(metrics, "vllm:request_success_total", finished_reason=reason) == 0


def test_vllm_buckets(metrics: WorkerMetrics):
    def buckets(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for (n, labels) in samples(metrics) if n == name + "_bucket")

    assert buckets("vllm:time_to_first_token_seconds") == [*TTFT_BUCKETS, float("inf")]
    assert buckets("vllm:inter_token_latency_seconds") == [*ITL_BUCKETS, float("inf")]
    assert buckets("vllm:time_per_output_token_seconds") == [*ITL_BUCKETS, float("inf")]
    assert buckets("vllm:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, float("inf")]
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_request_tracking(metrics: WorkerMetrics):
    t = metrics.tracker()
    t.on_output(1, num_prompt_tokens=5)
    t.on_output(1, num_prompt_tokens=5)  # prompt tokens count once per request
    t.on_output(2, num_prompt_tokens=5)
    t.on_finish("length")
    t.on_finish("length")  # idempotent
    assert value(metrics, "vllm:prompt_tokens_total") == 5
    assert value(metrics, "vllm:generation_tokens_total") == 4
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 1
    assert value(metrics, "vllm:inter_token_latency_seconds_count") == 2
    assert value(metrics, "vllm:time_per_output_token_seconds_count") == 2
    assert value(metrics, "vllm:e2e_request_latency_seconds_count") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 0
    # per-request lengths (the planner's workload basis), once per request
    assert value(metrics, "vllm:request_prompt_tokens_count") == 1
    assert value(metrics, "vllm:request_prompt_tokens_sum") == 5
    assert value(metrics, "vllm:request_generation_tokens_sum") == 4
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="5.0") == 1
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="2.0") == 0


def test_labels_from_env(monkeypatch):
    monkeypatch.setenv("BATON_LLMSERVICE", "svc")
    monkeypatch.setenv("BATON_NAMESPACE", "team")
    m = WorkerMetrics(model_name="x", role="decode", stats=EngineStats)
    assert m.labels == {"model_name": "x", "llmservice": "svc", "namespace": "team", "role": "decode"}


def test_scrape_survives_a_broken_engine():
    def broken() -> EngineStats:
        raise RuntimeError("engine gone")

    m = WorkerMetrics(model_name="x", role="both", stats=broken)
    text = m.render().decode()
    assert "vllm:time_to_first_token_seconds" in text
    assert "vllm:num_requests_running" not in text


def test_each_instance_has_its_own_registry():
    a = WorkerMetrics(model_name="a", role="both", stats=EngineStats)
    b = WorkerMetrics(model_name="b", role="both", stats=EngineStats)
    a.tracker().on_output(3, 1)
    assert 'model_name="b"' not in a.render().decode()
    assert "vllm:generation_tokens_total" in b.render().decode()
    (gen_b,) = [
        s.value
        for f in text_string_to_metric_families(b.render().decode())
        for s in f.samples
        if s.name == "vllm:generation_tokens_total"
    ]
    assert gen_b == 0
