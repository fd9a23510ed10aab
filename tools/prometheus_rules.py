#!/usr/bin/env python3
"""Generate Baton's Prometheus recording and alerting rules (charts/baton/files/prometheus-rules.yaml).

    python tools/prometheus_rules.py           # (re)write the rules file
    python tools/prometheus_rules.py --check   # exit 1 when the committed file differs from the generator
    promtool check rules charts/baton/files/prometheus-rules.yaml

The same file is a plain Prometheus rules file (for promtool / a non-Operator Prometheus) and, wrapped by the
chart's templates/prometheusrule.yaml, a PrometheusRule (only when the cluster serves monitoring.coreos.com/v1).

SLO alerts are multi-window, multi-burn-rate (Google SRE workbook, ch. 5): the error ratio of an SLI is the
share of requests slower than the target, read from the router's histogram buckets:
`1 - rate(bucket{le=TARGET}[w]) / rate(bucket{le="+Inf"}[w])`. With objective O (e.g. 0.9: 90 % of requests
within target, the LLMService's `slo.attainment`), the error budget is 1 - O; pages fire when both a long and
a short window burn the budget fast (1h & 5m at 14.4x, 6h & 30m at 6x), tickets when slower (1d & 2h at 3x,
3d & 6h at 1x). The chart replaces the defaults TTFT_LE / TPOT_LE / OBJECTIVE below with its values
(`metrics.prometheusRule.slo`); targets must be bucket bounds of the router histograms. The objective is
baked into the thresholds (`--objective`, default 0.9); thresholds are capped at MAX_ERROR_RATIO.

Metrics these rules expect beyond the list in docs/architecture.md (the contract for the operator and workers):
* `baton_autoscaler_prometheus_up{llmservice,namespace}`: 1 when the autoscaler's last Prometheus query for
  that LLMService succeeded, 0 when Prometheus was unreachable or refused the query.
* `baton_autoscaler_max_replicas{llmservice,namespace,role}`: the role's `autoscaling.maxReplicas`.
* `baton_kv_transport_info{...,transport}` (launch.Metric.KV_TRANSPORT_INFO, worker/metrics.py): what moves a
  Baton worker's KV bytes -- `tcp`, `rdma`, or `ucx-tcp`: NIXL without RDMA (no device, or UCX_TLS excludes it).
  Workers know only what they use, not what the LLMService asked for (there is no `requested` label).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from baton.launch import KV_TRANSPORT_UCX_TCP, Label, Metric

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "charts" / "baton" / "files" / "prometheus-rules.yaml"

TTFT_LE = "0.5"
TPOT_LE = "0.05"
OBJECTIVE = 0.9
BUDGET = round(1 - OBJECTIVE, 6)
#: An error ratio cannot exceed 1: with a low objective (0.9 -> budget 0.1) a 14.4x burn is impossible, so
#: every threshold is capped at 95 % of requests missing the target.
MAX_ERROR_RATIO = 0.95
BY = "namespace, llmservice"
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: (severity, [(long window, short window, burn-rate factor), ...], for)
BURNS = (
    ("critical", (("1h", "5m", 14.4), ("6h", "30m", 6)), "2m"),
    ("warning", (("1d", "2h", 3), ("3d", "6h", 1)), "15m"),
)
SLIS = {
    "ttft": ("baton_router_ttft_seconds", TTFT_LE, "time to first token"),
    "tpot": ("baton_router_tpot_seconds", TPOT_LE, "time per output token"),
}


@dataclass
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    #: What must return data for this alert to be able to fire (checked against a real Prometheus by the
    #: tests): the signals the condition compares, without the comparison.
    probes: tuple[str, ...]
    runbook: str = ""


def error_ratio(metric: str, le: str, window: str) -> str:
    return (f'1 - (sum by ({BY}) (rate({metric}_bucket{{le="{le}"}}[{window}]))'
            f' / sum by ({BY}) (rate({metric}_bucket{{le="+Inf"}}[{window}])))')


def threshold(factor: float) -> str:
    """The error ratio at which the budget burns `factor` times too fast, as a PromQL number."""
    return f"{min(factor * BUDGET, MAX_ERROR_RATIO):.6g}"


def record_name(sli: str, window: str) -> str:
    return f"baton:{sli}_slo_errors:ratio_rate{window}"


def recording_rules() -> list[dict]:
    rules = []
    for sli, (metric, le, _) in SLIS.items():
        for w in WINDOWS:
            rules.append({"record": record_name(sli, w), "expr": error_ratio(metric, le, w)})
    return rules


def slo_alerts() -> list[Alert]:
    out = []
    for sli, (_, le, what) in SLIS.items():
        for severity, pairs, for_ in BURNS:
            conds = [f"({record_name(sli, long)} > {threshold(factor)}"
                     f" and {record_name(sli, short)} > {threshold(factor)})" for long, short, factor in pairs]
            fast = severity == "critical"
            out.append(Alert(
                name=f"Baton{sli.upper()}BudgetBurn{'Fast' if fast else 'Slow'}",
                expr="\n or ".join(conds),
                for_=for_, severity=severity,
                summary=f"{{{{ $labels.namespace }}}}/{{{{ $labels.llmservice }}}}: {what} SLO error budget is "
                        f"burning {'fast' if fast else 'steadily'}",
                description=(f"More than the budgeted share of requests take longer than {le}s to "
                             f"{'the first token' if sli == 'ttft' else 'each further token'} "
                             f"(burn rate {' / '.join(str(f) for _, _, f in pairs)}x over "
                             f"{', '.join(f'{lw}&{sw}' for lw, sw, _ in pairs)}). Check the "
                             f"{'prefill' if sli == 'ttft' else 'decode'} pool: queue, KV usage, replicas."),
                probes=tuple(record_name(sli, w) for lw, sw, _ in pairs for w in (lw, sw)),
            ))
    return out


def other_alerts() -> list[Alert]:
    fail_rate = f"sum by ({BY}) (rate(baton_kv_transfer_failures_total[10m]))"
    ok_rate = f"sum by ({BY}) (rate(baton_kv_transfer_seconds_count[10m]))"
    rejected_rate = f'sum by ({BY}) (rate({Metric.ROUTER_PREFILL_FAILURES}{{outcome="rejected"}}[10m]))'
    requests_rate = f"sum by ({BY}) (rate(baton_router_requests_total[10m]))"
    return [
        Alert(
            name="BatonKVTransferFailing",
            expr=f"{fail_rate}\n / clamp_min({fail_rate} + {ok_rate}, 1e-9) > 0.05",
            for_="10m", severity="warning",
            summary="{{ $labels.namespace }}/{{ $labels.llmservice }}: KV transfers are failing",
            description="More than 5% of KV imports from prefill to decode failed over 10 minutes; requests fall "
                        "back to recomputing the prompt on decode (slower TTFT, more decode load).",
            probes=(fail_rate, ok_rate),
        ),
        Alert(
            name="BatonPrefillFailuresRejected",
            expr=f"{rejected_rate}\n / clamp_min({requests_rate}, 1e-9) > 0.01",
            for_="10m", severity="warning",
            summary="{{ $labels.namespace }}/{{ $labels.llmservice }}: requests rejected after prefill failures",
            description="More than 1% of requests got 503 over 10 minutes because their prefill failed (retries "
                        "spent) and the decode workers had no TPOT headroom to recompute the prompt "
                        "(spec.router.prefillFailure). Check the prefill pool: crashes, readiness, hop timeouts.",
            probes=(rejected_rate, requests_rate),
        ),
        Alert(
            name="BatonKVTransportDegraded",
            expr=(f'max by ({BY}, {Label.TRANSPORT}) ({Metric.KV_TRANSPORT_INFO}'
                  f'{{{Label.TRANSPORT}="{KV_TRANSPORT_UCX_TCP}"}}) > 0'),
            for_="5m", severity="warning",
            summary="{{ $labels.namespace }}/{{ $labels.llmservice }}: KV moves through NIXL without RDMA "
                    "({{ $labels.transport }})",
            description="Workers move KV caches with NIXL (kvTransfer.transport auto found it installed) but UCX "
                        "has no RDMA device or UCX_TLS excludes RDMA, so the bytes go over UCX's TCP: slower than "
                        "Baton's own tcp transport. Give the pods the RDMA device, or set kvTransfer.transport tcp.",
            probes=(f"max by ({BY}, {Label.TRANSPORT}) ({Metric.KV_TRANSPORT_INFO})",),
        ),
        Alert(
            name="BatonAutoscalerAtMaxReplicas",
            expr=(f"max by ({BY}, role) (baton_autoscaler_desired_replicas)\n"
                  f" >= on ({BY}, role) max by ({BY}, role) (baton_autoscaler_max_replicas)\n"
                  f" and on ({BY}) ({record_name('ttft', '30m')} > {threshold(1)} or {record_name('tpot', '30m')}"
                  f" > {threshold(1)})"),
            for_="30m", severity="warning",
            summary="{{ $labels.namespace }}/{{ $labels.llmservice }}: {{ $labels.role }} is stuck at "
                    "maxReplicas while the SLO is missed",
            description="The autoscaler wants more {{ $labels.role }} replicas than maxReplicas allows and the "
                        "SLO is still not met: raise maxReplicas, add GPUs, or relax the SLO.",
            probes=(f"max by ({BY}, role) (baton_autoscaler_desired_replicas)",
                    f"max by ({BY}, role) (baton_autoscaler_max_replicas)", record_name("ttft", "30m")),
        ),
        Alert(
            name="BatonAutoscalerPrometheusUnreachable",
            expr=f"max by ({BY}) (baton_autoscaler_prometheus_up) == 0",
            for_="5m", severity="warning",
            summary="{{ $labels.namespace }}/{{ $labels.llmservice }}: the autoscaler cannot query Prometheus",
            description="The operator's autoscaler failed to read metrics from spec.autoscaling.prometheusURL; "
                        "replicas are held where they are until it can.",
            probes=(f"max by ({BY}) (baton_autoscaler_prometheus_up)",),
        ),
    ]


def alerts() -> list[Alert]:
    return slo_alerts() + other_alerts()


def rules_document() -> dict:
    return {"groups": [
        {"name": "baton-slo-recording", "interval": "30s", "rules": recording_rules()},
        {"name": "baton-alerts", "rules": [
            {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
             "annotations": {"summary": a.summary, "description": a.description}}
            for a in alerts()
        ]},
    ]}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)

HEADER = ("# Generated by tools/prometheus_rules.py; do not edit by hand (a test fails on drift).\n"
          "# Check: promtool check rules charts/baton/files/prometheus-rules.yaml\n")


def render() -> str:
    return HEADER + yaml.dump(rules_document(), Dumper=_Dumper, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--objective", type=float, default=OBJECTIVE, help="attainment objective (0.9)")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    global BUDGET
    BUDGET = round(1 - args.objective, 6)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date; run `python tools/prometheus_rules.py`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
