"""`baton simulate`: run the autoscaling policy against a trace in the simulator (operator/simulate.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _rate_steps(text: str) -> list[tuple[float, float]]:
    try:
        steps = []
        for part in text.split(","):
            t, r = part.split(":")
            steps.append((float(t), float(r)))
        return steps
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected START:RATE[,START:RATE...] (seconds:req/s), got {text!r}") from exc


def add_simulate_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate the SLO autoscaler on a request trace (simulated time)",
        description="Discrete-event simulation of a prefill/decode fleet (DistServe A100 latency fits or a "
                    "a profile from baton profile) under Baton's autoscaling policy; prints SLO attainment, GPU-hours and "
                    "a replica timeline.")
    tr = p.add_argument_group("trace")
    tr.add_argument("--trace", help="JSONL trace: {timestamp, input_len, output_len} per line (the schema of "
                                    "baton bench and baton plan)")
    tr.add_argument("--rate-steps", type=_rate_steps, default=None,
                    help="Poisson arrivals, piecewise rate, e.g. 0:2,600:8,1200:4 (default 0:4)")
    tr.add_argument("--bursts", metavar="BASE,BURST,ON_S,OFF_S",
                    help="on-off Poisson bursts, e.g. 2,14,180,540")
    tr.add_argument("--duration", type=float, default=3600.0, help="trace length in seconds (default 3600)")
    tr.add_argument("--input-len", default="lognormal:600:400:16:4096",
                    help="prompt tokens: N, uniform:LO:HI or lognormal:MEAN:SD[:MIN:MAX] (as baton bench)")
    tr.add_argument("--output-len", default="lognormal:180:170:2:2048", help="output tokens, same forms")
    tr.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("workers")
    w.add_argument("--profile", default="a100-80g-distserve",
                   help="a profile file (baton profile) or a built-in name (default a100-80g-distserve)")
    w.add_argument("--model", help="model in the profile (default: its only model, or facebook/opt-13b for the "
                                   "built-in one)")
    w.add_argument("--prefill-tp", type=int, default=1)
    w.add_argument("--decode-tp", type=int, default=1)
    w.add_argument("--startup", type=float, default=60.0, help="pod start-up delay in seconds (default 60)")
    s = p.add_argument_group("service")
    s.add_argument("--ttft", type=float, default=0.5, help="TTFT p90 target, seconds (default 0.5)")
    s.add_argument("--tpot", type=float, default=0.05, help="TPOT p90 target, seconds (default 0.05)")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=8)
    s.add_argument("--interval", type=float, default=15.0)
    s.add_argument("--scale-down-stabilization", type=float, default=300.0)
    s.add_argument("--fixed", metavar="P,D", help="no autoscaler: a fixed fleet of P prefill and D decode")
    s.add_argument("--dynamo", action="store_true",
                   help="the Dynamo-style SLA planner baseline (operator/simulate_baselines.py) instead of Baton's "
                        "policy, on the same profile")
    p.add_argument("--timeline", action="store_true", help="print the replica timeline")
    p.add_argument("--json", action="store_true", help="print the summary (and timeline) as JSON")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from baton.operator.autoscale_policy import PolicyConfig, RoleBounds
    from baton.operator.simulate import BatonController, SimConfig, fixed_controller, simulate
    from baton.operator.simulate_baselines import DynamoPlannerController

    from baton.cli import CommandError
    from baton.profile import ProfileSet
    from baton.workload import LengthDist, load_trace, on_off_steps, poisson_requests

    try:
        profiles = ProfileSet.load(args.profile)
        model = args.model or ("facebook/opt-13b" if args.profile == "a100-80g-distserve" else None)
        pp = profiles.for_model(model).get(args.prefill_tp)
        dp = profiles.for_model(model).get(args.decode_tp)
        prompt = LengthDist.parse(args.input_len, flag="--input-len")
        output = LengthDist.parse(args.output_len, flag="--output-len")
        if sum(x is not None for x in (args.trace, args.rate_steps, args.bursts)) > 1:
            raise CommandError("choose one of --trace, --rate-steps, --bursts")
        if args.trace:
            trace = load_trace(args.trace)
        elif args.bursts:
            try:
                base, burst, on_s, off_s = (float(x) for x in args.bursts.split(","))
            except ValueError as exc:
                raise CommandError(f"--bursts: expected BASE,BURST,ON_S,OFF_S, got {args.bursts!r}") from exc
            trace = poisson_requests(on_off_steps(base, burst, on_s, off_s, args.duration), args.duration,
                                     prompt, output, args.seed)
        else:
            trace = poisson_requests(args.rate_steps or [(0.0, 4.0)], args.duration, prompt, output, args.seed)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        raise CommandError("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    cfg = SimConfig(pp, dp, ttft_slo_s=args.ttft, tpot_slo_s=args.tpot, interval_s=args.interval,
                    window_s=2 * args.interval, startup_s=args.startup,
                    initial_prefill=max(1, args.min_replicas), initial_decode=max(1, args.min_replicas))
    if args.fixed:
        try:
            np_, nd = (int(x) for x in args.fixed.split(","))
        except ValueError as exc:
            raise CommandError(f"--fixed: expected P,D, got {args.fixed!r}") from exc
        controller = fixed_controller(np_, nd)
    elif args.dynamo:
        controller = DynamoPlannerController(pp, dp, args.ttft, args.tpot, min_replicas=args.min_replicas,
                                             max_replicas=args.max_replicas, max_batch_tokens=cfg.max_batch_tokens)
    else:
        bounds = RoleBounds(args.min_replicas, args.max_replicas)
        controller = BatonController(PolicyConfig(
            ttft_slo_s=args.ttft, tpot_slo_s=args.tpot, prefill=bounds, decode=bounds, interval_s=args.interval,
            scale_down_stabilization_s=args.scale_down_stabilization))
    res = simulate(cfg, trace, controller)
    summary = res.summary()
    if args.json:
        out = {"summary": summary}
        if args.timeline:
            out["timeline"] = [dataclasses.asdict(p) for p in res.timeline]
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    print(f"requests {summary['requests']}, SLO attainment {summary['attainment']:.1%} "
          f"(TTFT {summary['ttft_attainment']:.1%}, TPOT {summary['tpot_attainment']:.1%}), "
          f"GPU-hours {summary['gpu_hours']:.2f}, max replicas P{summary['max_prefill']} D{summary['max_decode']}")
    if args.timeline:
        last = None
        for pt in res.timeline:
            key = (pt.prefill_replicas, pt.prefill_ready, pt.decode_replicas, pt.decode_ready)
            if key != last:
                print(f"{pt.time_s:8.0f}s  prefill {pt.prefill_ready}/{pt.prefill_replicas} ({pt.prefill_reason})"
                      f"  decode {pt.decode_ready}/{pt.decode_replicas} ({pt.decode_reason})")
                last = key
    return 0
