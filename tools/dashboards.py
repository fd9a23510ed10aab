#!/usr/bin/env python3
"""Generate Baton's Grafana dashboards with the Grafana Foundation SDK (PyPI `grafana-foundation-sdk`).

    python tools/dashboards.py            # (re)write charts/baton/dashboards/*.json
    python tools/dashboards.py --check    # exit 1 when the committed JSON differs from the generator

The chart turns every dashboards/*.json into a ConfigMap labelled grafana_dashboard: "1" (Grafana sidecar).
Metric names and labels are the contract in docs/architecture.md (Metrics): workers export vLLM's names plus
`baton_worker_info` and `baton_kv_*`, the router `baton_router_*`, the operator `baton_autoscaler_*`; every
series carries `llmservice`, `namespace` (and `role` where it applies).

Dashboard variables: `$namespace` and `$llmservice` (regex, multi), the SLO targets `$ttft_slo` / `$tpot_slo`
(seconds; choose a bucket bound of the router's histograms, since attainment is read from the bucket with that
`le`) and `$objective` (the attainment target, e.g. 0.9).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphDrawStyle, LegendDisplayMode, VisibilityMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
    Threshold,
    ThresholdsMode,
    VariableHide,
    VariableOption,
    VariableRefresh,
)

from baton.launch import TTFT_STAGES, VLLM_TTFT_BUCKETS, Label, Metric

REPO = Path(__file__).resolve().parents[1]
BUSY = Metric.ENGINE_BUSY_SECONDS + "_total"
OUT = REPO / "charts" / "baton" / "dashboards"

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace=~"$namespace", llmservice=~"$llmservice"'
RI = "$__rate_interval"
#: SLO targets offered: bucket bounds of the router's TTFT histogram (vLLM's TTFT buckets, launch.VLLM_TTFT_BUCKETS)
#: and of its TPOT histogram (worker/router/metrics.py), as Prometheus spells them in `le`.
TTFT_CHOICES = [str(b) for b in VLLM_TTFT_BUCKETS if 0.1 <= b <= 10.0]
TPOT_CHOICES = ["0.01", "0.02", "0.025", "0.03", "0.04", "0.05", "0.075", "0.1", "0.2"]


@dataclass
class Q:
    expr: str
    legend: str = ""


@dataclass
class P:
    """A panel: kind 'ts' (time series) or 'stat'."""

    title: str
    queries: list[Q]
    unit: str = "short"
    kind: str = "ts"
    description: str = ""
    w: int = 12
    h: int = 8
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    stack: bool = False


def quantiles(metric: str, by: str = "", qs=(0.5, 0.9, 0.99)) -> list[Q]:
    group = f"le{', ' + by if by else ''}"
    out = []
    for q in qs:
        name = f"p{int(q * 100)}"
        legend = f"{name} {{{{{by}}}}}" if by else name
        out.append(Q(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RI}])))", legend))
    return out


def share_within(metric: str, le_var: str) -> str:
    """Share of requests at or under the SLO: bucket le=<target> over the +Inf bucket."""
    return (f'sum(rate({metric}_bucket{{{SEL}, le="${le_var}"}}[{RI}]))'
            f' / sum(rate({metric}_bucket{{{SEL}, le="+Inf"}}[{RI}]))')


TTFT_SHARE = share_within("baton_router_ttft_seconds", "ttft_slo")
TPOT_SHARE = share_within("baton_router_tpot_seconds", "tpot_slo")
STAGE = Metric.ROUTER_TTFT_STAGE


def ttft_stages_p90() -> list[Q]:
    """p90 of each TTFT stage, in time order (stacked: where a slow first token spends its time)."""
    return [Q(f'histogram_quantile(0.9, sum by (le) (rate({STAGE}_bucket{{{SEL}, {Label.STAGE}="{s}"}}[{RI}])))', s)
            for s in TTFT_STAGES]


def ttft_stages_mean() -> list[Q]:
    """Mean of each TTFT stage: these stack up to the mean TTFT exactly (quantiles do not add up)."""
    return [Q(f'sum(rate({STAGE}_sum{{{SEL}, {Label.STAGE}="{s}"}}[{RI}])) / '
              f'sum(rate({STAGE}_count{{{SEL}, {Label.STAGE}="{s}"}}[{RI}]))', s) for s in TTFT_STAGES]


def fleet_overview() -> tuple[str, str, list[P]]:
    return "baton-fleet", "Baton / Fleet overview", [
        P("SLO attainment (TTFT and TPOT met)", [Q(f"({TTFT_SHARE}) * ({TPOT_SHARE})", "attainment")],
          unit="percentunit", kind="stat", w=6, h=5, min=0, max=1,
          thresholds=[(None, "red"), (0.8, "orange"), (0.9, "green")],
          description="Estimated share of requests meeting both SLOs: the product of the TTFT and TPOT shares "
                      "(the two histograms are separate; exact when misses are independent), as the autoscaler "
                      "computes it. Target: $objective."),
        P("TTFT within SLO", [Q(TTFT_SHARE, "ttft")], unit="percentunit", kind="stat", w=6, h=5, min=0, max=1,
          thresholds=[(None, "red"), (0.9, "green")]),
        P("TPOT within SLO", [Q(TPOT_SHARE, "tpot")], unit="percentunit", kind="stat", w=6, h=5, min=0, max=1,
          thresholds=[(None, "red"), (0.9, "green")]),
        P("Requests / s", [Q(f"sum(rate(baton_router_requests_total{{{SEL}}}[{RI}]))", "req/s")], unit="reqps",
          kind="stat", w=6, h=5),
        P("TTFT at the router (p50 / p90 / p99) vs target",
          quantiles("baton_router_ttft_seconds") + [Q("vector($ttft_slo)", "target")], unit="s",
          description="Time to first token as clients see it (router)."),
        P("TPOT at the router (p50 / p90 / p99) vs target",
          quantiles("baton_router_tpot_seconds") + [Q("vector($tpot_slo)", "target")], unit="s"),
        P("TTFT by stage (p90 of each, stacked)", ttft_stages_p90(), unit="s", stack=True,
          description="Where the time to first token goes: prefill_queue (router + prefill worker queue; grows "
                      "when prefill is short of workers), prefill_compute (the prompt's forward), kv_handoff (the "
                      "decode worker pulling the KV), first_decode (the rest: HTTP, decode queue, router). Each "
                      "stage's own p90, stacked (p90s do not add up exactly; the mean panel does). Stages a worker "
                      "does not report (vLLM) are missing."),
        P("TTFT by stage (mean, stacked)", ttft_stages_mean(), unit="s", stack=True,
          description="Mean seconds per stage; the stack is the mean TTFT of the requests with a stage breakdown."),
        P("Attainment over time vs objective",
          [Q(f"({TTFT_SHARE}) * ({TPOT_SHARE})", "attainment"), Q(TTFT_SHARE, "ttft share"),
           Q(TPOT_SHARE, "tpot share"), Q("vector($objective)", "objective")], unit="percentunit", min=0, max=1),
        P("Requests by outcome",
          [Q(f"sum by (outcome) (rate(baton_router_requests_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
          unit="reqps", stack=True),
        P("Prefill failures by what the router did",
          [Q(f"sum by (outcome) (rate({Metric.ROUTER_PREFILL_FAILURES}{{{SEL}}}[{RI}]))", "{{outcome}}")],
          unit="reqps", stack=True,
          description="Requests whose prefill hop failed (or found no healthy prefill worker): retried_ok (another "
                      "prefill worker served), recomputed (the decode worker ran the prompt), rejected (503 + "
                      "Retry-After: spec.router.prefillFailure). Rejections mean decode had no TPOT headroom."),
        P("Replicas per role: serving vs desired",
          [Q(f"count by (role) (baton_worker_info{{{SEL}}})", "serving {{role}}"),
           Q(f"max by (role) (baton_autoscaler_desired_replicas{{{SEL}}})", "desired {{role}}")],
          description="Serving = workers Prometheus scrapes (baton_worker_info); desired = the autoscaler's."),
        P("Autoscaler decisions by reason",
          [Q(f"sum by (role, reason) (increase(baton_autoscaler_decisions_total{{{SEL}}}[{RI}]))",
             "{{role}} {{reason}}")], stack=True),
        P("Router requests in flight per role",
          [Q(f"sum by (role) (baton_router_inflight{{{SEL}}})", "{{role}}")]),
        P("Queue (waiting requests) per role",
          [Q(f"sum by (role) (vllm:num_requests_waiting{{{SEL}}})", "{{role}}")]),
    ]


def role_detail() -> tuple[str, str, list[P]]:
    by = "role"
    return "baton-roles", "Baton / Prefill & decode detail", [
        P("Waiting requests (queue)", [Q(f"sum by (role) (vllm:num_requests_waiting{{{SEL}}})", "{{role}}")]),
        P("Running requests (batch size)", [Q(f"sum by (role) (vllm:num_requests_running{{{SEL}}})", "{{role}}")]),
        P("KV cache usage", [Q(f"avg by (role) (vllm:kv_cache_usage_perc{{{SEL}}})", "avg {{role}}"),
                             Q(f"max by (role) (vllm:kv_cache_usage_perc{{{SEL}}})", "max {{role}}")],
          unit="percentunit", min=0, max=1),
        P("Prompt tokens / s (prefill throughput)",
          [Q(f"sum by (role) (rate(vllm:prompt_tokens_total{{{SEL}}}[{RI}]))", "{{role}}")], unit="short"),
        P("Generated tokens / s (decode throughput)",
          [Q(f"sum by (role) (rate(vllm:generation_tokens_total{{{SEL}}}[{RI}]))", "{{role}}")], unit="short"),
        P("Busy share (forward steps)",
          [Q(f"avg by (role) (rate({BUSY}{{{SEL}}}[{RI}]))", "avg {{role}}"),
           Q(f"max by (role) (rate({BUSY}{{{SEL}}}[{RI}]))", "max {{role}}")], unit="percentunit", min=0, max=1,
          description="Share of time the Baton engine ran forward steps (baton_engine_busy_seconds_total); "
                      "vLLM workers do not export it."),
        P("Prefill capacity (prompt tokens per busy second, one replica)",
          [Q(f"sum by (role) (rate(vllm:prompt_tokens_total{{{SEL}, role=~\"prefill|both\"}}[{RI}])) / "
             f"sum by (role) (rate({BUSY}{{{SEL}, role=~\"prefill|both\"}}[{RI}]))", "{{role}}")], unit="short",
          description="What one replica computes while busy: the autoscaler sizes prefill on the prompt-token "
                      "demand against this (its LoadAboveCapacity, QueueBacklog and ArrivalRateRising reasons)."),
        P("Worker TTFT (p50 / p90 / p99)", quantiles("vllm:time_to_first_token_seconds", by), unit="s"),
        P("Worker inter-token latency (p50 / p90 / p99)", quantiles("vllm:inter_token_latency_seconds", by),
          unit="s"),
        P("Worker end-to-end latency (p90)",
          quantiles("vllm:e2e_request_latency_seconds", by, qs=(0.9,)), unit="s"),
        P("Finished requests / s by reason",
          [Q(f"sum by (role, finished_reason) (rate(vllm:request_success_total{{{SEL}}}[{RI}]))",
             "{{role}} {{finished_reason}}")], unit="reqps"),
        P("Preemptions / s", [Q(f"sum by (role) (rate(vllm:num_preemptions_total{{{SEL}}}[{RI}]))", "{{role}}")]),
    ]


def kv_transfer() -> tuple[str, str, list[P]]:
    return "baton-kv", "Baton / KV transfer", [
        P("KV bytes / s (imported by decode)",
          [Q(f"sum by (llmservice) (rate(baton_kv_transfer_bytes_total{{{SEL}}}[{RI}]))", "{{llmservice}}")],
          unit="Bps"),
        P("KV transfer latency (p50 / p90 / p99)", quantiles("baton_kv_transfer_seconds"), unit="s"),
        P("Transfers / s", [Q(f"sum(rate(baton_kv_transfer_seconds_count{{{SEL}}}[{RI}]))", "transfers")],
          unit="ops"),
        P("Transfer failures / s by reason",
          [Q(f"sum by (reason) (rate(baton_kv_transfer_failures_total{{{SEL}}}[{RI}]))", "{{reason}}")],
          unit="ops", stack=True),
        P("Transport in use (workers per transport)",
          [Q(f"count by (transport) (baton_kv_transport_info{{{SEL}}})", "{{transport}}")], kind="stat", w=12,
          description="What actually moves the bytes (rdma, ucx-tcp, tcp, inprocess): a silent RDMA->TCP "
                      "fallback shows up here."),
        P("Requests that fell back to recompute / s",
          [Q(f'sum(rate(baton_router_requests_total{{{SEL}, outcome="fallback_recompute"}}[{RI}]))',
             "fallback_recompute")], unit="reqps",
          description="The router re-ran prefill on the decode worker because the KV handoff failed."),
    ]


def _variables(builder: dashboard.Dashboard) -> None:
    builder.with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    for name, query in (("namespace", "label_values(baton_worker_info, namespace)"),
                        ("llmservice", 'label_values(baton_worker_info{namespace=~"$namespace"}, llmservice)')):
        builder.with_variable(
            dashboard.QueryVariable(name).label(name).datasource(DS).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all")))
    for name, label, choices, default in (("ttft_slo", "TTFT SLO (s)", TTFT_CHOICES, "0.5"),
                                          ("tpot_slo", "TPOT SLO (s)", TPOT_CHOICES, "0.05")):
        builder.with_variable(
            dashboard.CustomVariable(name).label(label).values(",".join(choices))
            .current(VariableOption(selected=True, text=default, value=default)))
    builder.with_variable(dashboard.TextBoxVariable("objective").label("Attainment objective").default_value("0.9")
                          .hide(VariableHide.DONT_HIDE))


def _panel(p: P, x: int, y: int, pid: int):
    if p.kind == "stat":
        from grafana_foundation_sdk.builders.common import ReduceDataOptions
        from grafana_foundation_sdk.models.common import (
            BigValueColorMode,
            BigValueGraphMode,
            BigValueTextMode,
        )
        b = (stat.Panel().graph_mode(BigValueGraphMode.AREA).color_mode(BigValueColorMode.VALUE)
             .text_mode(BigValueTextMode.AUTO).reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
    else:
        b = (timeseries.Panel().line_width(1).fill_opacity(10 if p.stack else 0).draw_style(GraphDrawStyle.LINE)
             .show_points(VisibilityMode.NEVER)
             .legend(_legend()))
        if p.stack:
            from grafana_foundation_sdk.builders.common import StackingConfig
            from grafana_foundation_sdk.models.common import StackingMode
            b = b.stacking(StackingConfig().mode(StackingMode.NORMAL))
    b = b.id(pid).title(p.title).datasource(DS).unit(p.unit).grid_pos(GridPos(h=p.h, w=p.w, x=x, y=y))
    if p.description:
        b = b.description(p.description)
    if p.min is not None:
        b = b.min(p.min)
    if p.max is not None:
        b = b.max(p.max)
    if p.thresholds:
        from grafana_foundation_sdk.builders.dashboard import ThresholdsConfig
        b = b.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
            [Threshold(value=v, color=c) for v, c in p.thresholds]))
    for i, q in enumerate(p.queries):
        b = b.with_target(prometheus.Dataquery().expr(q.expr).legend_format(q.legend or "__auto")
                          .ref_id(chr(ord("A") + i)).datasource(DS))
    return b


def _legend():
    from grafana_foundation_sdk.builders.common import VizLegendOptions
    from grafana_foundation_sdk.models.common import LegendPlacement
    return VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)


def build(uid: str, title: str, panels: list[P]) -> dict:
    b = (dashboard.Dashboard(title).uid(uid).tags(["baton", "llm"]).editable().refresh("30s")
         .time("now-1h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR))
    _variables(b)
    x = y = 0
    row_h = 0
    for pid, p in enumerate(panels, start=1):
        if x + p.w > 24:
            x, y, row_h = 0, y + row_h, 0
        b = b.with_panel(_panel(p, x, y, pid))
        x += p.w
        row_h = max(row_h, p.h)
    model = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(b.build()))
    model["description"] = "Generated by tools/dashboards.py (grafana-foundation-sdk); do not edit by hand."
    return model


DASHBOARDS = (fleet_overview, role_detail, kv_transfer)


def render_all() -> dict[str, str]:
    """{file name: JSON text} for every dashboard."""
    out = {}
    for make in DASHBOARDS:
        uid, title, panels = make()
        out[f"{uid}.json"] = json.dumps(build(uid, title, panels), indent=2, sort_keys=True) + "\n"
    return out


def queries(model: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard model."""
    return [(p["title"], t["expr"]) for p in model.get("panels", []) for t in p.get("targets", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON is out of date")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    wanted = render_all()
    stale = sorted(name for name, text in wanted.items()
                   if not (args.out / name).exists() or (args.out / name).read_text() != text)
    extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in wanted) if args.out.exists() else []
    if args.check:
        if stale or extra:
            print(f"dashboards out of date: {', '.join(stale + extra)}; run `python tools/dashboards.py`",
                  file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in extra:
        (args.out / name).unlink()
    for name, text in wanted.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(wanted)} dashboards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
