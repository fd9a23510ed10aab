"""`baton plan --trace` replays the trace (its own (input, output) pairs, not a lognormal fitted to them) and
says so; a moments-only workload stays a fitted lognormal and says that; the shipped profiles name their
models' attention heads, and degrees that do not divide them are not offered."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from baton.operator.planner.admissible import profile_attention_heads, role_tensor_parallel_problem
from baton.operator.planner.basis import WorkloadBasis
from baton.operator.planner.cli import _workload, add_plan_command
from baton.operator.planner.search import searchable_degrees

from baton.profile import BUILTIN, ProfileSet
from baton.workload import Workload, load_trace, percentile


def write_bimodal_trace(path: Path, n: int) -> list[tuple[int, int]]:
    """60 % short prompts with long answers, 40 % long prompts with short answers, 4 requests a second."""
    pairs = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            p, o = ((40 + (i * 7) % 40, 100 + (i * 11) % 50) if i % 5 < 3 else
                    (1400 + (i * 13) % 400, 10 + (i * 3) % 20))
            pairs.append((p, o))
            f.write(json.dumps({"timestamp": 100 + i * 0.25, "input_len": p, "output_len": o}) + "\n")
    return pairs


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_plan_command(ap.add_subparsers())
    return ap.parse_args(["plan", "--quiet", *argv])


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    args = parse(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_the_plans_workload_replays_the_trace(tmp_path):
    trace = tmp_path / "bimodal.jsonl"
    pairs = write_bimodal_trace(trace, 1000)
    w = _workload(parse(["--trace", str(trace)]))
    reqs = w.requests(1500, seed=0)
    ins = [p for p, _ in pairs]
    got = [r.prompt_tokens for r in reqs]
    # the trace's median sits in the short mode, its p90 in the long one; a lognormal fit keeps neither
    assert percentile(got, 50) == pytest.approx(percentile(ins, 50), rel=0.05)
    assert percentile(got, 90) == pytest.approx(percentile(ins, 90), rel=0.05)
    assert {(r.prompt_tokens, r.output_tokens) for r in reqs} <= set(pairs)
    assert w.rate == pytest.approx(4.0) and w.lengths_model() == "trace replay of 1000 requests"


def test_baton_plan_trace_end_to_end(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    write_bimodal_trace(trace, 200)
    code, out = run_cli(["--trace", str(trace), "--gpus-per-node", "4", "--requests", "200"], capsys)
    assert code == 0, out
    assert "workload   trace replay of 200 requests: input empirical (median" in out
    assert "target 4 req/s" in out and "chosen" in out and "LLMService fragment" in out
    code, out = run_cli(["--trace", str(trace), "--gpus-per-node", "4", "--requests", "200", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["plan"]["workload"]["lengths"] == "trace replay of 200 requests"


def test_a_trace_without_input_lengths_is_refused(tmp_path):
    from baton.cli import CommandError

    trace = tmp_path / "prompts.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "prompt": "hello", "output_len": 5}) + "\n")
    with pytest.raises(CommandError, match="needs input_len on every line"):
        args = parse(["--trace", str(trace)])
        args.func(args)


def test_moments_only_is_a_fitted_lognormal_and_says_so():
    # the online basis: a mean and a p90 from Prometheus histograms, no requests to replay
    w = WorkloadBasis(5.0, 700.0, 1500.0, 200.0, 450.0).workload(2048)
    assert w.prompt.kind == "lognormal" and w.lengths_model() == "fitted lognormal"
    assert _workload(parse(["--input-len", "lognormal:500:400", "--output-len", "64"])).lengths_model() == (
        "input fitted lognormal, output fixed")


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_shipped_profiles_name_every_models_heads(name):
    ps = ProfileSet.load(name)
    heads = {m: profile_attention_heads(ps, m) for m in ps.models}
    assert heads == {"facebook/opt-13b": 40, "facebook/opt-66b": 72}
    for model, n in heads.items():
        # every degree the profile has divides the heads (TP3 of OPT-66B: 24 heads a GPU) ...
        assert all(n % tp == 0 for tp in ps.for_model(model).tensor_parallel_degrees)
        # ... and one that does not is not offered, with a note saying why
        notes: list[str] = []
        assert searchable_degrees([1, 2, 4, 8, 16], 16, role_tensor_parallel_problem, n, notes) == [1, 2, 4, 8]
        assert notes == [f"TP16 not searched: the model's {n} attention heads do not split evenly over 16 GPUs"]


def test_baton_plan_reads_the_heads_from_the_profile(tmp_path, capsys):
    # the shipped OPT-13B fits with a made-up TP16 entry: 40 heads do not split 16 ways, so it is not searched
    doc = ProfileSet.load("a100-80g-distserve").to_dict()
    doc["models"] = {"facebook/opt-13b": {**doc["models"]["facebook/opt-13b"],
                                          "16": doc["models"]["facebook/opt-13b"]["4"]}}
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(doc))
    code, out = run_cli(["--profile", str(prof), "--workload", "sharegpt", "--gpus-per-node", "16",
                         "--requests", "100", "--json"], capsys)
    plan = json.loads(out)
    assert code == 0
    assert sorted(plan["instanceRPS"]["prefill"]) == ["1", "2", "4"]
    assert "TP16 not searched: the model's 40 attention heads do not split evenly over 16 GPUs" in plan["notes"]


SHAREGPT = Path(__file__).resolve().parents[1] / "data" / "sharegpt_opt_lengths.jsonl"


def test_distserve_headline_on_sharegpt_lengths(capsys):
    """DistServe's headline setting on the ShareGPT lengths its own preparation makes (tests/data/README.md):
    OPT-13B, 1 node x 4 A100-80G, TTFT 200 ms / TPOT 100 ms for 90 %, the colocated rival on vLLM's fits. Its
    simulator gives prefill TP2 + decode TP1 at 1.56-1.88 req/s per GPU; the plan must pick that layout within
    10 % of that range."""
    lengths = Workload.from_trace(load_trace(SHAREGPT))
    ins = [p for p, _ in lengths.pairs]
    # the shape DistServe's preparation gives (median 695, p90 1555 input tokens over the whole set)
    assert percentile(ins, 50) == pytest.approx(695, rel=0.02) and percentile(ins, 90) == pytest.approx(1555, rel=0.02)
    code, out = run_cli(["--trace", str(SHAREGPT), "--gpus-per-node", "4", "--colocated-profile", "a100-80g-vllm",
                         "--json"], capsys)
    doc = json.loads(out)
    plan = doc["plan"]
    assert code == 0 and plan["layout"] == "disaggregated"
    assert plan["prefill"] == {"tensorParallel": 2, "replicas": 1}
    assert plan["decode"] == {"tensorParallel": 1, "replicas": 1}
    assert 1.56 * 0.9 <= plan["goodputPerGPU"] <= 1.88 * 1.1, plan["goodputPerGPU"]
    assert plan["workload"]["lengths"] == "trace replay of 2000 requests"
