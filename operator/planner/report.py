"""A plan for people and for manifests: the ranked table `baton plan` prints, the LLMService fragment, and the
`status.plan` object the operator writes. Pure."""
from __future__ import annotations

from typing import Any

from baton.operator.planner.search import COLOCATED, Plan


def spec_fragment(plan: Plan) -> dict[str, Any]:
    """The part of an LLMService spec the plan decides (camelCase, as in the manifest)."""
    c = plan.chosen
    if c is None:
        return {}
    if c.kind == COLOCATED:
        # Baton serves colocated as a decode-only fleet (the router recomputes the prefill on decode); locality
        # any, because `zone`/`node` make decode pods require a prefill pod nearby, and there is none
        return {"prefill": {"replicas": 0, "tensorParallel": c.prefill_tp},
                "decode": {"replicas": c.decode_replicas, "tensorParallel": c.decode_tp},
                "kvTransfer": {"locality": "any"}}
    return {"prefill": {"replicas": c.prefill_replicas, "tensorParallel": c.prefill_tp},
            "decode": {"replicas": c.decode_replicas, "tensorParallel": c.decode_tp},
            "kvTransfer": {"locality": plan.locality}}


def to_status(plan: Plan) -> dict[str, Any]:
    """`status.plan`: what the plan is, what it predicts, and the workload it was made for."""
    c = plan.chosen
    out: dict[str, Any] = {
        # `lengths`: how the plan drew request lengths (a trace replay, or a lognormal fitted to moments)
        "workload": {"rate": round(plan.workload.rate, 4), "lengths": plan.workload.lengths_model(),
                     "inputLength": str(plan.workload.prompt), "outputLength": str(plan.workload.output)},
    }
    if c is None:
        out["message"] = "; ".join(plan.notes) or plan.why()
        return out
    out.update({
        "layout": c.kind,
        "prefill": {"tensorParallel": c.prefill_tp, "replicas": c.prefill_replicas if c.kind != COLOCATED else 0},
        "decode": {"tensorParallel": c.decode_tp, "replicas": c.decode_replicas},
        "locality": plan.locality,
        "gpus": c.gpus,
        "capacityRPS": round(c.capacity_rps, 4),
        "goodputPerGPU": round(c.goodput_per_gpu, 4),
        "binding": c.binding,
        "reason": plan.why(),
    })
    if plan.colocated is not None:
        out["colocatedGoodputPerGPU"] = round(plan.colocated.goodput_per_gpu, 4)
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def format_plan(plan: Plan, top: int = 10) -> str:
    """The human report: inputs (and how lengths were drawn: a trace replay or a fit), per-instance goodput,
    ranked layouts, the choice and why."""
    w, s, cl = plan.workload, plan.slo, plan.cluster
    target = f"target {plan.target_rps:g} req/s" if plan.target_rps else "no target rate (most per GPU)"
    lines = [
        f"workload   {w.lengths_model()}: input {w.prompt}, output {w.output}; {target}",
        f"SLO        TTFT {_ms(s.ttft_s)} and TPOT {_ms(s.tpot_s)} for {s.attainment:.0%} of requests",
        (f"cluster    {cl.nodes} node(s) x {cl.gpus_per_node} GPUs, links {cl.intra_node_gb_s:g} GB/s in a node, "
         f"{cl.inter_node_gb_s:g} GB/s across"),
        "",
        "one instance carries (req/s within its SLO):",
        f"  {'TP':>3} {'prefill':>9} {'decode':>9} {'colocated':>10}",
    ]
    tps = sorted(set().union(*(d.keys() for d in plan.instance_rps.values()))) if plan.instance_rps else []
    for tp in tps:
        row = [plan.instance_rps.get(k, {}).get(tp) for k in ("prefill", "decode", "colocated")]
        lines.append(f"  {tp:>3} " + " ".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in row[:2])
                     + f" {'-' if row[2] is None else f'{row[2]:.2f}':>10}")
    lines += ["", f"  {'#':>2}  {'layout':<40} {'GPUs':>4} {'req/s':>7} {'req/s/GPU':>9}  binds"]
    shown = [c for c in plan.candidates if c.kind != COLOCATED][:top] + \
        [c for c in plan.candidates if c.kind == COLOCATED][:3]
    for i, c in enumerate(shown, 1):
        mark = "*" if c is plan.chosen else " "
        lines.append(f"{mark}{i:>2}  {c.describe():<40} {c.gpus:>4} {c.capacity_rps:>7.2f} "
                     f"{c.goodput_per_gpu:>9.2f}  {c.binding}")
    lines.append("")
    if plan.chosen is None:
        lines.append("no plan: " + ("; ".join(plan.notes) or plan.why()))
        return "\n".join(lines)
    c = plan.chosen
    lines.append(f"chosen     {c.describe()}, kvTransfer.locality {plan.locality}: "
                 f"{c.goodput_per_gpu:.2f} req/s per GPU")
    lines.append(f"why        {plan.why()}")
    gain = plan.gain_over_colocated
    if gain is not None and plan.colocated is not None and c.kind != COLOCATED:
        lines.append(f"vs         the best colocated layout, {plan.colocated.describe()[len('colocated '):]}: "
                     f"{plan.colocated.goodput_per_gpu:.2f} req/s per GPU -> disaggregation x{gain:.2f}")
    if plan.check is not None:
        k = plan.check
        lines.append(f"fleet sim  at {k.rate_rps:.2f} req/s: TTFT p90 {_ms(k.ttft_p90_s)} "
                     f"({k.ttft_attainment:.1%} within), TPOT p90 {_ms(k.tpot_p90_s)} "
                     f"({k.tpot_attainment:.1%} within), both {k.attainment:.1%}")
    lines.extend(f"note       {n}" for n in plan.notes)
    return "\n".join(lines)
