"""Goodput of a colocated worker vs a disaggregated prefill/decode pair on the same two CPU cores.

    python benchmarks/disagg_goodput.py            # tiny model, default workload (~6-7 minutes on 2 cores)
    python benchmarks/disagg_goodput.py --quick    # fewer requests and rates
    python benchmarks/disagg_goodput.py --rates 2,4,6,8 --num-requests 60 --slo-ttft 250ms --slo-tpot 8ms

All three set-ups run through `baton up` (real processes: router + workers on loopback) and are measured with
`baton bench` (Poisson arrivals, streaming, ignore_eos) on the same prompt-heavy workload and seed:

- colocated:     `baton up --colocated --cpus-per-worker 2`: one `both` worker, 2 threads, pinned to 2 cores,
                 whole prompts per prefill step (`--no-enable-chunked-prefill`): a long prompt stalls the decodes.
- chunked:       the same worker with chunked prefill (Sarathi-Serve, the strongest colocated design): steps of
                 `--chunk-budget` tokens, every running decode plus prompt chunks.
- disaggregated: `baton up --cpus-per-worker 1`: 1 prefill + 1 decode worker, 1 thread and 1 core each,
                 KV cache moved over the TCP transport (when this build has it; otherwise the decode worker
                 recomputes, which the output says).

Prefix caching is off in all three (this compares step shapes and placement; the prompts share no prefix).
The router (and the load generator) are not pinned; they share the machine in every set-up alike.
With --until-miss (default) the sweep goes on past the top rate while any set-up still meets the SLO there, so
each goodput is a measurement, not a lower bound.
Goodput (DistServe) = highest swept rate at which >= --attainment of requests meet both SLOs (and every lower
rate did too). The set-ups rotate over --repeats runs; per rate the requests of all repeats are pooled
before the attainment is computed (each repeat's own goodput is printed too, to show the noise). The ratio
disaggregated / colocated is printed as measured, whatever it is.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RATIOS = (("disaggregated", "colocated"), ("chunked", "colocated"), ("disaggregated", "chunked"))
BATON = (sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())")

SPEC = """\
apiVersion: baton.dev/v1alpha1
kind: LLMService
metadata: {{name: goodput}}
spec:
  model:
    name: bench-model
    source: {{hostPath: {{path: {model}}}}}
    maxModelLen: {max_model_len}
  engine: {{kind: baton}}
  prefill: {{replicas: {prefill}}}
  decode: {{replicas: {decode}}}
  router: {{replicas: 1, policy: least-loaded}}
  kvTransfer: {{transport: tcp}}
"""


def start_up(spec: Path, run_dir: Path, extra: list[str], env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([*BATON, "up", str(spec), "--run-dir", str(run_dir), "--log-level", "warning",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.match(r"OpenAI endpoint: (\S+)", line)
            if m:
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout=300)
    if "url" not in found:
        stop_up(proc)
        raise SystemExit("baton up failed:\n" + "\n".join(lines))
    return proc, found["url"], lines


def stop_up(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_config(name: str, extra: list[str], args, spec: Path, work: Path, env: dict, rep: int) -> dict:
    run_dir = work / f"{name}-{rep}"
    print(f"--- {name} (repeat {rep + 1}): baton up {' '.join(extra)}", flush=True)
    proc, url, _ = start_up(spec, run_dir, extra, env)
    try:
        out = run_dir / "bench.json"
        cmd = [*BATON, "bench", "--url", url, "--rate", args.rates, "--num-requests", str(args.num_requests),
               "--input-len", args.input_len, "--output-len", args.output_len, "--slo-ttft", args.slo_ttft,
               "--slo-tpot", args.slo_tpot, "--attainment", str(args.attainment), "--seed", str(args.seed),
               "--warmup", "3", "--output", str(out), "--quiet"]
        if args.goodput_search:
            cmd += ["--goodput-search", "--search-steps", str(args.search_steps)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"baton bench failed ({name}):\n{r.stderr}")
        sys.stdout.write("".join(f"    {line}\n" for line in r.stdout.splitlines()))
        report = json.loads(out.read_text())
    finally:
        stop_up(proc)
    fleet = json.loads((run_dir / "fleet.json").read_text())
    return {"name": name, "goodput": report["goodput"]["goodput_rps"], "report": report,
            "kv_transport": fleet.get("kv_transport"), "fleet": fleet}


def _passes_top(rs: list[dict], top: float, args) -> bool:
    """Whether the pooled requests of every repeat at rate `top` met the SLO."""
    from baton.worker.bench import RequestResult, meets_slo, parse_duration

    reqs = [RequestResult(**q) for r in rs for run in r["report"]["runs"] if float(run["rate"]) == top
            for q in run["requests"]]
    ttft, tpot = parse_duration(args.slo_ttft), parse_duration(args.slo_tpot)
    return bool(reqs) and sum(meets_slo(q, ttft, tpot) for q in reqs) / len(reqs) >= args.attainment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="existing model directory (default: create one)")
    ap.add_argument("--size", choices=("tiny", "100m", "smollm2"), default="tiny",
                    help="the model: random tiny/100m Llama, or the real SmolLM2-135M-Instruct (cached)")
    ap.add_argument("--rates", default=None, help="request rates to sweep (req/s; default 8,12,...,40)")
    ap.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 60)")
    ap.add_argument("--input-len", default="uniform:512:896",
                    help="prompt tokens (approximate; keep input + output below --max-model-len)")
    ap.add_argument("--output-len", default="uniform:32:64")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--slo-ttft", default="250ms")
    ap.add_argument("--slo-tpot", default="8ms")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--tpot-sensitivity", default="4ms,6ms,8ms,12ms",
                    help="also print both goodputs for these TPOT targets (same measurements; '' to skip)")
    ap.add_argument("--goodput-search", action="store_true", help="bisect after the sweep")
    ap.add_argument("--search-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each set-up (pooled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="30 requests per rate, rates 16,32,48")
    ap.add_argument("--chunk-budget", type=int, default=256,
                    help="chunked contender: --max-num-batched-tokens, the step's token budget (256)")
    ap.add_argument("--until-miss", action=argparse.BooleanOptionalAction, default=True,
                    help="extend the sweep (x1.25, x1.5 of the top rate) while any contender still meets the "
                         "SLO at the top rate (default on)")
    ap.add_argument("--max-rate", type=float, default=400.0, help="--until-miss stops before this rate")
    ap.add_argument("--json", default=None, help="write everything measured here")
    args = ap.parse_args(argv)
    args.rates = args.rates or ("16,32,48" if args.quick else "8,12,16,20,24,28,32,36,40")
    args.num_requests = args.num_requests or (30 if args.quick else 80)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print(f"note: only {len(cpus)} CPU available; both set-ups will share it", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="baton-goodput-") as tmp:
        work = Path(tmp)
        if args.model_dir:
            model = Path(args.model_dir)
        else:
            from baton.worker.tiny import ensure_benchmark_model

            model = ensure_benchmark_model(args.size, work)
        spec = work / "service.yaml"
        spec.write_text(SPEC.format(model=model.resolve(), max_model_len=args.max_model_len, prefill=1, decode=1))
        # prefix caching off everywhere: this compares step shapes, and the synthetic prompts share no prefix
        same = ["--worker-arg=--no-enable-prefix-caching"]
        configs = [("colocated", ["--colocated", "--cpus-per-worker", "2",
                                  "--worker-arg=--no-enable-chunked-prefill", *same]),
                   ("chunked", ["--colocated", "--cpus-per-worker", "2", "--worker-arg=--enable-chunked-prefill",
                                f"--worker-arg=--max-num-batched-tokens={args.chunk_budget}", *same]),
                   ("disaggregated", ["--cpus-per-worker", "1", *same])]
        results: dict[str, list[dict]] = {name: [] for name, _ in configs}
        rates = [float(r) for r in args.rates.split(",")]
        while True:
            for rep in range(args.repeats):
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]
                for name, extra in order:
                    results[name].append(run_config(name, extra, args, spec, work, env, rep))
            # every contender must miss somewhere, or its goodput is only a lower bound: sweep further
            top = max(rates)
            passing = [n for n, rs in results.items() if _passes_top(rs, top, args)]
            if not passing or not args.until_miss or top * 1.5 > args.max_rate:
                break
            rates = [round(top * f) for f in (1.25, 1.5)]
            print(f"--- {', '.join(passing)} still met the SLO at {top:g} req/s: sweeping {rates} too", flush=True)
            args.rates = ",".join(f"{r:g}" for r in rates)
        elapsed = time.monotonic() - t0

    from baton.worker.bench import RequestResult, goodput_from_sweep, meets_slo, parse_duration

    from baton.workload import percentile

    slo_ttft, slo_tpot = parse_duration(args.slo_ttft), parse_duration(args.slo_tpot)

    def pooled(rs: list[dict]) -> dict[float, dict]:
        """Per rate: every request of every repeat together (failed requests count as misses)."""
        out: dict[float, dict] = {}
        for r in rs:
            for run in r["report"]["runs"]:
                d = out.setdefault(float(run["rate"]), {"reqs": [], "tok_s": []})
                d["reqs"] += [RequestResult(**q) for q in run["requests"]]
                d["tok_s"].append(run["summary"]["output_tokens_per_s"] or 0.0)
        for d in out.values():
            reqs = d["reqs"]
            d["attainment"] = sum(meets_slo(q, slo_ttft, slo_tpot) for q in reqs) / len(reqs)
            d["ttft_p90"] = percentile([q.ttft for q in reqs if q.ok], 90) or 0.0
            d["tpot_p90"] = percentile([q.tpot for q in reqs if q.ok and q.tpot is not None], 90) or 0.0
            d["tok_s"] = statistics.mean(d["tok_s"])
        return out

    pools = {name: pooled(rs) for name, rs in results.items()}
    goodputs = {name: goodput_from_sweep([(rate, d["attainment"]) for rate, d in pool.items()], args.attainment)
                for name, pool in pools.items()}
    kv = results["disaggregated"][0]["kv_transport"] or "none (decode recomputes the prompt)"
    print()
    print("=" * 86)
    print(f"disaggregated vs colocated vs chunked-prefill colocated goodput, {args.size} model, {len(cpus)} CPUs, "
          f"{elapsed:.0f}s total")
    print(f"workload: Poisson arrivals, {args.num_requests} requests per rate x {args.repeats} repeat(s), "
          f"input {args.input_len} tokens, output {args.output_len} tokens (ignore_eos), seed {args.seed}")
    print(f"SLO: TTFT <= {args.slo_ttft} and TPOT <= {args.slo_tpot} for >= {args.attainment:.0%} of requests")
    print("colocated:     1 x `both` worker, 2 threads on 2 pinned cores (+ router); whole-prompt prefill steps")
    print(f"chunked:       the same, chunked prefill (Sarathi-Serve): {args.chunk_budget}-token steps mixing decodes "
          "and prompt chunks")
    print(f"disaggregated: 1 prefill + 1 decode worker, 1 thread on 1 pinned core each (+ router); "
          f"KV transport: {kv}")
    print("(prefix caching off in all three; per rate: all repeats pooled; p90 over the pooled requests; "
          "tok/s = mean output tokens/s)")
    print()
    rates = sorted({rate for pool in pools.values() for rate in pool})
    print(f"{'rate':>6} | " + " | ".join(f"{n:^39}" for n in pools))
    print(f"{'req/s':>6} | " + " | ".join(f"{'attain':>7} {'TTFT p90':>9} {'TPOT p90':>9} {'tok/s':>8}   "
                                          for _ in pools))
    for rate in rates:
        cells = []
        for pool in pools.values():
            d = pool.get(rate)
            cells.append(f"{'-':>39}" if d is None else
                         f"{100 * d['attainment']:>6.1f}% {1000 * d['ttft_p90']:>7.1f}ms "
                         f"{1000 * d['tpot_p90']:>7.2f}ms {d['tok_s']:>8.0f}   ")
        print(f"{rate:>6g} | " + " | ".join(cells))
    print()
    low = min(rates)
    for name in pools:
        g = goodputs[name]
        per_repeat = [r["goodput"] for r in results[name][:args.repeats]]
        bound = " (every swept rate passed: a lower bound)" if g == max(rates) else ""
        print(f"goodput {name + ':':<15} {f'{g:g} req/s' if g is not None else f'< {low:g} req/s'}{bound}"
              + (f"   (each repeat alone: {per_repeat})" if args.repeats > 1 else ""))
    for a, b in RATIOS:
        ga, gb = goodputs[a], goodputs[b]
        print(f"ratio {a} / {b}: " + (f"{ga / gb:.2f}x" if ga and gb else
                                       "undefined (met the SLO at no swept rate; lower --rates or loosen the SLO)"))
    if args.tpot_sensitivity:
        print()
        print(f"sensitivity (same requests, TTFT <= {args.slo_ttft}, other TPOT targets):")
        for text in args.tpot_sensitivity.split(","):
            tpot = parse_duration(text.strip())
            gs = {}
            for name, pool in pools.items():
                pts = [(rate, sum(meets_slo(q, slo_ttft, tpot) for q in d["reqs"]) / len(d["reqs"]))
                       for rate, d in pool.items()]
                gs[name] = goodput_from_sweep(pts, args.attainment)
            shown = "  ".join(f"{n} {f'{g:g}' if g is not None else f'<{low:g}'}{'+' if g == max(rates) else ''}"
                              for n, g in gs.items())
            ratio = "  ".join(f"{a[:4]}/{b[:4]} " + (f"{gs[a] / gs[b]:.2f}x" if gs[a] and gs[b] else "undefined")
                              for a, b in RATIOS)
            print(f"  TPOT <= {text.strip():>6}: goodput {shown} req/s; {ratio}")
        print("  (+: every swept rate passed, a lower bound)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
