"""A plan for people and for manifests: the ranked table `baton plan` prints, the LLMService fragment, and the
`status.plan` object the operator writes. Pure.

Pipeline parallelism is report-only: an LLMService has no pipeline field (render gives each worker
`tensorParallel` GPUs and vLLM `--tensor-parallel-size` only), so a pipelined layout is printed with what its
engine needs (vLLM's `--pipeline-parallel-size`), and the fragment is the best layout without it."""
from __future__ import annotations

from typing import Any

from baton.operator.planner.search import COLOCATED, Layout, Plan, degree


def spec_fragment(plan: Plan) -> dict[str, Any]:
    """The part of an LLMService spec the plan decides (camelCase, as in the manifest): the chosen layout, or the
    best one without pipeline parallelism when the chosen one has it (an LLMService cannot run it)."""
    c = plan.chosen if plan.chosen is None or not plan.chosen.pipelined else plan.applicable
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
        # where the KV hand-off time's bandwidth came from: the fleet's measurement or the configured constant
        "kvLink": {"source": "measured" if plan.link_source.startswith("measured") else "configured",
                   "intraNodeGBps": round(plan.cluster.intra_node_gb_s, 4),
                   "interNodeGBps": round(plan.cluster.inter_node_gb_s, 4), "reason": plan.link_source},
    }
    if c is None:
        out["message"] = "; ".join(plan.notes) or plan.why()
        return out
    prefill = {"tensorParallel": c.prefill_tp, "replicas": c.prefill_replicas if c.kind != COLOCATED else 0}
    decode = {"tensorParallel": c.decode_tp, "replicas": c.decode_replicas}
    # only a pipelined layout has the key (the operator searches none, so its layouts compare as before)
    if c.prefill_pp > 1:
        prefill["pipelineParallel"] = c.prefill_pp
    if c.decode_pp > 1:
        decode["pipelineParallel"] = c.decode_pp
    out.update({
        "layout": c.kind,
        "prefill": prefill,
        "decode": decode,
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


def pipeline_needs(layout: Layout | None) -> str:
    """What a layout with pipeline parallelism needs from the engine, and that Baton does not run it (yet)."""
    general = ("layouts with PPn run n pipeline stages per instance (TP x PP GPUs each, in one node): vLLM's "
               "--pipeline-parallel-size n; the Baton engine has none. Report-only: an LLMService has no "
               "pipeline field, so apply mode and the fragment never use them")
    if layout is None:
        return general
    need = [f"{role} workers --pipeline-parallel-size {pp} --tensor-parallel-size {tp} ({tp * pp} GPUs each)"
            for role, tp, pp in (("prefill", layout.prefill_tp, layout.prefill_pp),
                                 ("decode", layout.decode_tp, layout.decode_pp)) if pp > 1]
    return f"the chosen layout needs vLLM with {'; '.join(need)}. {general[0].upper()}{general[1:]}"


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
        (f"cluster    {cl.nodes} node(s) x {cl.gpus_per_node} GPUs, links {cl.intra_node_gb_s:.3g} GB/s in a node, "
         f"{cl.inter_node_gb_s:.3g} GB/s across ({plan.link_source})"),
        "",
        ("one instance carries (req/s within its SLO; colocated: "
         f"{'chunked prefill' if plan.colocated_chunked else 'whole-prompt prefill steps'}, as the profile's engine):"),
        f"  {'':<8} {'prefill':>9} {'decode':>9} {'colocated':>10}",
    ]
    rows: list[tuple[str, list[float | None]]] = []
    tps = sorted(set().union(*(d.keys() for d in plan.instance_rps.values()))) if plan.instance_rps else []
    for tp in tps:
        rows.append((degree(tp), [plan.instance_rps.get(k, {}).get(tp) for k in ("prefill", "decode", "colocated")]))
    piped = plan.pipeline_rps
    for unit in sorted(set().union(*(d.keys() for d in piped.values())) if piped else []):
        rows.append((degree(*unit), [piped.get(k, {}).get(unit) for k in ("prefill", "decode")] + [None]))
    for label, row in rows:
        lines.append(f"  {label:<8} " + " ".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in row[:2])
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
    if any(x.pipelined for x in shown):
        lines.append(f"PP         {pipeline_needs(c) if c.pipelined else pipeline_needs(None)}")
        if c.pipelined and plan.applicable is not None:
            a = plan.applicable
            lines.append(f"apply      {a.describe()}: {a.goodput_per_gpu:.2f} req/s per GPU, the best layout without "
                         "pipeline parallelism (the LLMService fragment below)")
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
