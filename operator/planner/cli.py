"""`baton plan`: the DistServe placement search for one model, SLO, workload and cluster.

    baton plan --profile a100-80g-distserve --model facebook/opt-13b --workload sharegpt \\
        --slo-ttft 200ms --slo-tpot 100ms --gpus-per-node 4

Prints the workload (a trace replay, or a lognormal fitted to moments), per-instance goodput per phase and
tensor-parallel degree (and pipeline-parallel degree, where the profile's engine has one), the ranked layouts,
the chosen one with the SLO that binds it, the best colocated layout for comparison, a whole-fleet simulation of
the choice, and the LLMService fragment to paste (`--json` for all of it as one object). A layout with pipeline
parallelism is report-only (the `PP` line says what vLLM needs for it); the fragment is then the best layout
without it.
"""
from __future__ import annotations

import argparse
import json
import sys

from baton.profile import BUILTIN, ModelProfiles, ProfileSet
from baton.workload import PRESETS, LengthDist, Workload, load_trace, parse_duration


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="choose tensor parallelism, replicas and locality per phase from SLOs and profiles",
        description="DistServe's planner: per-phase parallelism and instance counts that carry the most requests "
                    "per GPU within the TTFT/TPOT targets, KV locality from link bandwidth, and the best "
                    "colocated layout for comparison.")
    m = p.add_argument_group("model")
    m.add_argument("--profile", default="a100-80g-distserve",
                   help="latency profile: a file written by `baton profile`, or a built-in name "
                        "(a100-80g-distserve, a100-80g-vllm); default a100-80g-distserve")
    m.add_argument("--model", help="model in the profile (default: its only one; facebook/opt-13b for built-ins)")
    m.add_argument("--colocated-profile", help="profile of the colocated rival (default: the same)")
    m.add_argument("--kv-bytes-per-token", type=int, default=None,
                   help="KV cache bytes per token (default: the profile's; 0 ignores hand-off time)")
    m.add_argument("--no-pipeline-parallel", dest="pipeline", action="store_false",
                   help="search tensor parallelism only (default: also the pipeline-parallel degrees the profile "
                        "declares; those layouts are report-only: an LLMService cannot run them)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["sharegpt"], help="length preset (ShareGPT-like chat lengths)")
    w.add_argument("--input-len", help="prompt tokens: N, uniform:LO:HI or lognormal:MEAN:SD[:MIN:MAX]")
    w.add_argument("--output-len", help="output tokens, same forms")
    w.add_argument("--trace", help="JSONL trace (baton bench's schema), replayed: its (input, output) length "
                                   "pairs and its mean rate; every line needs input_len")
    w.add_argument("--rate", type=float, default=None,
                   help="target requests/s the layout must carry (default: the trace's, else none: the most "
                        "per GPU the cluster allows)")
    s = p.add_argument_group("SLO")
    s.add_argument("--slo-ttft", default="200ms", help="TTFT target, e.g. 200ms (default 200ms)")
    s.add_argument("--slo-tpot", default="100ms", help="TPOT target, e.g. 100ms (default 100ms)")
    s.add_argument("--attainment", type=float, default=0.9, help="share of requests within each target (0.9)")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--intra-node-bw", type=float, default=300.0, help="GB/s between GPUs of a node (300)")
    c.add_argument("--inter-node-bw", type=float, default=12.5, help="GB/s between nodes (12.5 = 100 Gb/s)")
    p.add_argument("--requests", type=int, default=1000, help="requests per simulation (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from baton.operator.planner.admissible import profile_attention_heads
    from baton.operator.planner.report import format_plan, spec_fragment, to_status
    from baton.operator.planner.search import SLO, Cluster, plan

    from baton.cli import CommandError

    try:
        profile_set = ProfileSet.load(args.profile)
        profiles = _model_profiles(profile_set, args.model, args.profile in BUILTIN)
        coloc = (_model_profiles(ProfileSet.load(args.colocated_profile), args.model or profiles.model,
                                 args.colocated_profile in BUILTIN) if args.colocated_profile else None)
        slo = SLO(parse_duration(args.slo_ttft, flag="--slo-ttft"), parse_duration(args.slo_tpot, flag="--slo-tpot"),
                  args.attainment)
        if not 0 < args.attainment <= 1:
            raise ValueError(f"--attainment: must be in (0, 1], got {args.attainment}")
        for flag in ("gpus_per_node", "nodes", "requests"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
        if args.intra_node_bw <= 0 or args.inter_node_bw <= 0:
            raise ValueError("--intra-node-bw and --inter-node-bw must be greater than 0 (GB/s)")
        if args.rate is not None and args.rate < 0:
            raise ValueError(f"--rate: must be 0 or more, got {args.rate}")
        cluster = Cluster(args.gpus_per_node, args.nodes, args.intra_node_bw, args.inter_node_bw)
        workload = _workload(args)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"baton plan: {msg}", file=sys.stderr, flush=True)

    # degrees the API refuses (not a power of two) or the model cannot split into are not offered
    result = plan(profiles, workload, slo, cluster, target_rps=args.rate,
                  kv_bytes_per_token=args.kv_bytes_per_token, colocated_profiles=coloc,
                  num_requests=args.requests, seed=args.seed, progress=progress,
                  attention_heads=profile_attention_heads(profile_set, profiles.model), pipeline=args.pipeline)
    fragment = spec_fragment(result)
    if args.json:
        out = {"plan": to_status(result), "spec": fragment,
               "candidates": [{"layout": c.describe(), "kind": c.kind, "gpus": c.gpus,
                               "capacityRPS": c.capacity_rps, "goodputPerGPU": c.goodput_per_gpu,
                               "binding": c.binding, "pipelined": c.pipelined} for c in result.candidates],
               "instanceRPS": {k: {str(tp): v for tp, v in d.items()} for k, d in result.instance_rps.items()},
               # pipelined instances by phase and "TPxPP" (e.g. "1x2": TP1, 2 stages)
               "pipelineRPS": {k: {f"{tp}x{pp}": v for (tp, pp), v in d.items()}
                               for k, d in result.pipeline_rps.items()},
               "fleetCheck": result.check.__dict__ if result.check else None, "notes": result.notes}
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0 if result.chosen else 1
    print(format_plan(result, args.top))
    if fragment:
        import yaml

        print("\nLLMService fragment:\n" + yaml.safe_dump({"spec": fragment}, sort_keys=False).rstrip())
    return 0 if result.chosen else 1


def _model_profiles(ps: ProfileSet, model: str | None, builtin: bool) -> ModelProfiles:
    if model is None and builtin:
        model = "facebook/opt-13b"
    return ps.for_model(model)


def _workload(args: argparse.Namespace) -> Workload:
    """Lengths from a trace (replayed: its own (input, output) pairs), a preset or flags (flags override a
    preset; these are distributions, lognormals when only moments are known); the rate from --rate or the
    trace."""
    if args.trace:
        if args.workload or args.input_len or args.output_len:
            raise ValueError("--trace gives the lengths: drop --workload/--input-len/--output-len")
        # replayed, not fitted: its rate is the target unless --rate says otherwise
        return Workload.from_trace(load_trace(args.trace), where=args.trace)
    base = PRESETS[args.workload] if args.workload else None
    if base is None and not (args.input_len and args.output_len):
        raise ValueError("give --workload sharegpt, --trace FILE, or both --input-len and --output-len")
    prompt = LengthDist.parse(args.input_len, flag="--input-len") if args.input_len else base.prompt
    output = LengthDist.parse(args.output_len, flag="--output-len") if args.output_len else base.output
    return Workload(args.rate or 0.0, prompt, output)
