"""The planner against the machine at hand: predicted vs measured goodput, side by side.

    python benchmarks/planner.py             # tiny model, ~10 minutes on 2 cores
    python benchmarks/planner.py --quick     # fewer requests and rates

1. `baton profile` measures the Baton engine here (1 torch thread: one core is one "GPU").
2. `baton plan` plans the machine (`--gpus-per-node` = the cores) for the workload and SLOs below, and
   predicts each layout's goodput (requests/s within the SLOs).
3. Every layout the plan ranks first among the disaggregated and the colocated ones runs with `baton up`
   (real router + workers on loopback, one core each) and `baton bench` measures its goodput on the same
   workload (Poisson arrivals, streaming; a sweep around the prediction, then bisection).
4. Printed: predicted, measured, measured / predicted, and whether the planner's ranking held.

The profile times the engine's forward passes only; HTTP, streaming, the router and the bench client share
the same two cores, so the measured goodput is expected below the prediction. The ratio says by how much.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disagg_goodput import BATON, SPEC, start_up, stop_up


def run(cmd: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what} failed:\n{r.stdout}\n{r.stderr}")
    return r


def measure(layout: dict, args, model: Path, work: Path, env: dict) -> dict:
    """Run `layout` with baton up and measure its goodput with baton bench."""
    colocated = layout["kind"] == "colocated"
    spec = work / f"{layout['kind']}.yaml"
    spec.write_text(SPEC.format(model=model.resolve(), max_model_len=args.max_model_len,
                                prefill=0 if colocated else layout["prefill"], decode=layout["decode"]))
    extra = ["--cpus-per-worker", "1"] + (["--colocated"] if colocated else [])
    predicted = layout["capacity"]
    rates = sorted({round(predicted * f, 2) for f in ((0.5, 1.0, 1.5) if args.quick else (0.4, 0.7, 1.0, 1.3))
                    if predicted * f > 0})
    run_dir = work / layout["kind"]
    print(f"--- {layout['name']}: baton up {' '.join(extra)}; rates {rates}", flush=True)
    proc, url, _ = start_up(spec, run_dir, extra, env)
    try:
        out = run_dir / "bench.json"
        cmd = [*BATON, "bench", "--url", url, "--rate", ",".join(map(str, rates)),
               "--num-requests", str(args.num_requests), "--input-len", args.input_len,
               "--output-len", args.output_len, "--slo-ttft", args.slo_ttft, "--slo-tpot", args.slo_tpot,
               "--attainment", str(args.attainment), "--seed", "0", "--warmup", "3", "--output", str(out),
               "--quiet", "--goodput-search", "--search-steps", "2" if args.quick else "3"]
        r = run(cmd, env, f"baton bench ({layout['name']})")
        sys.stdout.write("".join(f"    {line}\n" for line in r.stdout.splitlines()))
        report = json.loads(out.read_text())
    finally:
        stop_up(proc)
    return {**layout, "measured": report["goodput"]["goodput_rps"] or 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="existing model directory (default: create one)")
    ap.add_argument("--size", choices=("tiny", "100m", "smollm2"), default="tiny",
                    help="the model: random tiny/100m Llama, or the real SmolLM2-135M-Instruct (cached)")
    ap.add_argument("--cores", type=int, default=None, help="cores to plan for (default: this machine's)")
    ap.add_argument("--input-len", default="uniform:512:896")
    ap.add_argument("--output-len", default="uniform:32:64")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--slo-ttft", default="250ms")
    ap.add_argument("--slo-tpot", default="8ms")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 60; quick 30)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write everything measured here (and the profile beside it)")
    args = ap.parse_args(argv)
    args.num_requests = args.num_requests or (30 if args.quick else 60)
    cores = args.cores or len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="baton-planner-") as tmp:
        work = Path(tmp)
        if args.model_dir:
            model = Path(args.model_dir)
        else:
            from baton.worker.tiny import ensure_benchmark_model

            model = ensure_benchmark_model(args.size, work)
        profile = work / "profile.json"
        print(f"--- baton profile ({model.name}, 1 thread)", flush=True)
        run([*BATON, "profile", "--model", str(model), "-o", str(profile), "--threads", "1", "--max-prompt",
             str(args.max_model_len - 64), "--repeats", "5", "--name", "bench-model"], env, "baton profile")
        print(f"--- baton plan for {cores} cores", flush=True)
        r = run([*BATON, "plan", "--profile", str(profile), "--gpus-per-node", str(cores), "--input-len",
                 args.input_len, "--output-len", args.output_len, "--slo-ttft", args.slo_ttft, "--slo-tpot",
                 args.slo_tpot, "--attainment", str(args.attainment), "--json", "--quiet"], env, "baton plan")
        plan = json.loads(r.stdout)
        chosen = plan["plan"]
        layouts = []
        for kind in ("disaggregated", "colocated"):
            best = next((c for c in plan["candidates"] if c["kind"] == kind), None)
            if best is None:
                continue
            parts = best["layout"].replace("prefill ", "").replace("decode ", "").replace("colocated ", "")
            counts = [int(p.split(" x ")[0]) for p in parts.split(" + ")]
            layouts.append({"kind": kind, "name": best["layout"], "capacity": best["capacityRPS"],
                            "prefill": counts[0] if kind == "disaggregated" else 0, "decode": counts[-1]})
        print(f"    chosen: {chosen.get('layout')} P{chosen['prefill']} D{chosen['decode']}; "
              f"{chosen.get('reason', '')}", flush=True)
        results = [measure(lay, args, model, work, env) for lay in layouts]
        if args.json:  # the profile too: the plan can be re-made from it (another model, another schedule)
            Path(args.json).with_suffix(".profile.json").write_text(profile.read_text())
    elapsed = time.monotonic() - t0

    print(f"\n=== predicted vs measured goodput (req/s within TTFT {args.slo_ttft} / TPOT {args.slo_tpot} "
          f"for {args.attainment:.0%}), {cores} cores")
    print(f"{'layout':<44} {'predicted':>10} {'measured':>10} {'measured/predicted':>19}")
    for res in results:
        ratio = res["measured"] / res["capacity"] if res["capacity"] else float("nan")
        print(f"{res['name']:<44} {res['capacity']:>10.2f} {res['measured']:>10.2f} {ratio:>19.2f}")
    if len(results) == 2:
        pred = results[0]["capacity"] > results[1]["capacity"]
        meas = results[0]["measured"] > results[1]["measured"]
        print(f"ranking: the planner put {results[0]['name'] if pred else results[1]['name']} first; measured "
              f"{'agrees' if pred == meas else 'DISAGREES'}")
    print(f"({elapsed / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan, "results": results, "elapsed_s": elapsed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
