"""Pipeline parallelism in the planner: DistServe's stage model on hand-computable cases, only for profiles whose
engine has it, report-only (the fragment and the operator never carry it), and DistServe's loose-SLO winner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from baton.operator.planner import SLO, Cluster, plan
from baton.operator.planner.instance import decode_latencies, prefill_latencies
from baton.operator.planner.report import format_plan, spec_fragment, to_status

from baton.profile import ModelProfiles, PipelinedProfile, ProfileSet
from baton.workload import LengthDist, Request, Workload, load_trace
from tests.operator.test_planner import flat

TRACE = Path(__file__).resolve().parents[1] / "data" / "sharegpt_opt_lengths.jsonl"


def test_a_pipelined_prefill_takes_the_next_batch_after_one_stage():
    # three 10-token requests at once, one per batch: 100 ms of model, 2 stages of 50 ms + 1 ms overhead each
    reqs = [Request(0.0, 10, 5)] * 3
    assert prefill_latencies(flat(limit=10), reqs).ttft == pytest.approx([0.1, 0.2, 0.3])
    piped = PipelinedProfile(flat(limit=10), stages=2, stage_overhead_s=0.001, kv_capacity_tokens=200_000)
    # a batch ends after both stages (102 ms); the next enters stage 1 as soon as the one before has left it
    assert prefill_latencies(piped, reqs).ttft == pytest.approx([0.102, 0.153, 0.204])


def test_a_pipelined_decode_round_is_one_micro_batch_through_every_stage():
    base = flat(step_ms=10, per_ctx_ms=0.01)
    piped = PipelinedProfile(base, stages=2, stage_overhead_s=0.001, kv_capacity_tokens=200_000)
    # 4 running requests, 400 context tokens: 2 micro-batches of 2 (200 tokens), each round costs one of them
    assert piped.decode_step_s(4, 400) == pytest.approx(base.decode_step_s(2, 200) + 0.002)
    assert piped.decode_step_s(1, 100) == pytest.approx(base.decode_step_s(1, 100) + 0.002)
    # KV capacity is the pipelined instance's: two requests of 150 fit where one TP1 instance holds 200 tokens
    two = [Request(0.0, 100, 51), Request(0.0, 100, 51)]
    assert decode_latencies(flat(kv=200), two).tpot[1] > 0.015  # the second waits for the first
    wide = PipelinedProfile(flat(kv=200), stages=2, stage_overhead_s=0.0, kv_capacity_tokens=400)
    assert max(decode_latencies(wide, two).tpot) < 0.011


def test_kv_capacity_of_a_pipelined_instance():
    m = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b")
    assert m.pipeline_degrees == (1, 2, 4) and m.pipeline_stage_overhead_s == pytest.approx(0.001)
    # TP1 x PP2: the same 2 GPUs as TP2, the weights held once: DistServe's table gives both 163008 tokens
    assert m.pipelined(1, 2).kv_capacity_tokens == m.get(2).kv_capacity_tokens == 163008
    # no TP8 in the profile: 2 x TP4's capacity (a lower bound)
    assert m.pipelined(4, 2).kv_capacity_tokens == 2 * m.get(4).kv_capacity_tokens
    assert m.pipelined(2, 1) is m.get(2)


def test_only_profiles_whose_engine_has_pipelines_are_searched_with_them():
    w = Workload(0.0, LengthDist.fixed(100), LengthDist.fixed(20))
    slo, cluster = SLO(2.0, 0.2, 0.9), Cluster(gpus_per_node=4)
    # a profile `baton profile` writes (the Baton engine) declares none: tensor parallelism only
    baton = ModelProfiles("m", {1: flat(prefill_ms=30, kv=50_000, limit=4096)})
    assert plan(baton, w, slo, cluster, num_requests=200, check=False).pipeline_rps == {}
    declared = ModelProfiles("m", {1: flat(prefill_ms=30, kv=50_000, limit=4096)}, pipeline_degrees=(1, 2),
                             pipeline_stage_overhead_s=0.001)
    p = plan(declared, w, slo, cluster, num_requests=200, check=False)
    assert set(p.pipeline_rps["prefill"]) == {(1, 2)}
    # the operator asks for none (an LLMService has no pipeline field)
    assert plan(declared, w, slo, cluster, num_requests=200, check=False, pipeline=False).pipeline_rps == {}


@pytest.mark.parametrize("bad,field", [({"degrees": "2"}, "pipeline_parallel.degrees"),
                                       ({"degrees": [0]}, "pipeline_parallel.degrees"),
                                       ({"degrees": [2], "stage_overhead_ms": -1}, "pipeline_parallel.stage_overhead_ms"),
                                       ([2], "pipeline_parallel")])
def test_a_bad_pipeline_declaration_names_the_field(bad, field):
    doc = ProfileSet.load("a100-80g-distserve").to_dict()
    doc["pipeline_parallel"] = bad
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ProfileSet.from_dict(doc).for_model("facebook/opt-13b")


@pytest.fixture(scope="module")
def loose():
    """OPT-13B, one node of 8 A100-80G, loose SLOs (TTFT 1 s, TPOT 200 ms): DistServe's simulator picks prefill
    TP1 PP2 there; the ShareGPT lengths of tests/data. (The README's example.)"""
    dist = ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b")
    vllm = ProfileSet.load("a100-80g-vllm").for_model("facebook/opt-13b")
    return plan(dist, Workload.from_trace(load_trace(TRACE)), SLO(1.0, 0.2, 0.9), Cluster(gpus_per_node=8),
                colocated_profiles=vllm)


def test_at_loose_slos_the_winner_is_pipelined_and_reported_not_applied(loose):
    c = loose.chosen
    assert (c.prefill_tp, c.prefill_pp) == (1, 2) and c.pipelined, c.describe()
    # pipelining beats the same GPUs as two replicas (the first stage frees after half the prefill)
    assert loose.pipeline_rps["prefill"][(1, 2)] > 2 * loose.instance_rps["prefill"][1]
    # the fragment is the best layout an LLMService can run, never the pipelined one
    a = loose.applicable
    assert a is not None and not a.pipelined and a.goodput_per_gpu <= c.goodput_per_gpu
    assert spec_fragment(loose)["prefill"] == {"replicas": a.prefill_replicas, "tensorParallel": a.prefill_tp}
    status = to_status(loose)
    assert status["prefill"]["pipelineParallel"] == 2
    assert status["decode"].get("pipelineParallel", 1) == c.decode_pp  # the key only where there are stages
    text = format_plan(loose)
    assert "  TP1 PP2  " in text and f"* 1  {c.describe()}" in text
    assert ("PP         the chosen layout needs vLLM with prefill workers --pipeline-parallel-size 2 "
            "--tensor-parallel-size 1 (2 GPUs each)") in text, text
    assert "Report-only: an LLMService has no pipeline field" in text
    assert f"apply      {a.describe()}" in text
    assert any("fleet sim not run" in n for n in loose.notes)


def test_baton_plan_no_pipeline_parallel(capsys):
    from tests.operator.test_planner_trace import run_cli

    argv = ["--trace", str(TRACE), "--gpus-per-node", "4", "--slo-ttft", "1s", "--slo-tpot", "200ms",
            "--requests", "200", "--json"]
    code, out = run_cli(argv, capsys)
    doc = json.loads(out)
    assert code == 0 and doc["pipelineRPS"]["prefill"] and any(c["pipelined"] for c in doc["candidates"])
    code, out = run_cli([*argv, "--no-pipeline-parallel"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["pipelineRPS"] == {} and not any(c["pipelined"] for c in doc["candidates"])
