"""`baton bench`: the pure parts (schedules, attainment, goodput search) and one run
against a real `baton worker --role both` on the tiny model."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
from baton.e2e.processes import worker_process
from baton.worker.bench import (
    Progress,
    PromptMaker,
    RequestResult,
    goodput_from_sweep,
    goodput_search,
    meets_slo,
    parse_duration,
    parse_rates,
    summarize,
    synthetic_schedule,
    trace_schedule,
)
from baton.worker.local_fleet import free_port

from baton.workload import LengthDist, load_trace

BATON = (sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())")

# ------------------------------------------------------------------------------------------ parsing


def test_parse_duration():
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration("0.5s") == 0.5
    assert parse_duration("2m") == 120
    assert parse_duration("250us") == pytest.approx(250e-6)
    for bad in ("50", "fast", "ms", "-1s"):
        with pytest.raises(ValueError, match="with a unit"):
            parse_duration(bad)


def test_parse_rates():
    assert parse_rates("4,1, 2,2") == [1.0, 2.0, 4.0]
    assert parse_rates("inf") == [math.inf]
    for bad, msg in (("0", "greater than 0"), ("x", "not a number"), (",", "at least one")):
        with pytest.raises(ValueError, match=msg):
            parse_rates(bad)


def test_same_seed_same_lengths_other_words_at_every_rate():
    maker = PromptMaker(1.0)
    a = synthetic_schedule(1.0, LengthDist.parse("uniform:4:8"), LengthDist.parse("3"), maker, 7,
                           num_requests=10, duration=None)
    b = synthetic_schedule(5.0, LengthDist.parse("uniform:4:8"), LengthDist.parse("3"), maker, 7,
                           num_requests=10, duration=None)
    assert [(x.input_len, x.output_len) for x in a] == [(x.input_len, x.output_len) for x in b]
    assert [len(x.prompt.split()) for x in a] == [len(x.prompt.split()) for x in b]
    assert [x.at for x in a] == pytest.approx([5 * x.at for x in b])
    assert all(4 <= len(x.prompt.split()) <= 8 for x in a)
    # other words at each rate (a prefix-caching server must not answer a later rate from its cache), the same
    # words for the same rate and seed
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    again = synthetic_schedule(1.0, LengthDist.parse("uniform:4:8"), LengthDist.parse("3"), maker, 7,
                               num_requests=10, duration=None)
    assert [x.prompt for x in again] == [x.prompt for x in a]


def test_prompt_maker_uses_tokens_per_word():
    rng = random.Random(0)
    assert len(PromptMaker(2.0).make(100, rng).split()) == 50
    assert len(PromptMaker(0.5).make(100, rng).split()) == 200
    assert len(PromptMaker(1.0).make(0, rng).split()) == 1


# ------------------------------------------------------------------------------------------ statistics


def r(ok=True, ttft=0.1, tpot=0.01, out=10, err=""):
    return RequestResult(ok=ok, ttft=ttft if ok else None, tpot=tpot if ok else None, e2e=1.0 if ok else None,
                         output_len=out if ok else 0, input_len=100, expected_output_len=out, error=err)


def test_meets_slo():
    assert meets_slo(r(), 0.5, 0.05)
    assert not meets_slo(r(ttft=0.6), 0.5, 0.05)
    assert not meets_slo(r(tpot=0.06), 0.5, 0.05)
    assert meets_slo(r(tpot=None, out=1), 0.5, 0.05)  # one token: no TPOT
    assert not meets_slo(r(ok=False), 0.5, 0.05)
    assert meets_slo(r(ttft=9), None, 0.05) and meets_slo(r(tpot=9), 0.5, None)
    assert meets_slo(r(ttft=0.5, tpot=0.05), 0.5, 0.05)  # the targets themselves pass


def test_summarize_counts_failures_as_misses():
    results = [r(ttft=0.1 * i, tpot=0.01) for i in range(1, 9)] + [
        r(ok=False, err="HTTP 503: overloaded 1"), r(ok=False, err="HTTP 503: overloaded 2")]
    s = summarize(results, wall=5.0, slo_ttft=0.55, slo_tpot=0.02)
    assert s["requests"] == 10 and s["completed"] == 8 and s["failed"] == 2
    assert s["slo_attainment"] == pytest.approx(0.5)  # ttft 0.1..0.5 pass: 5 of 10
    assert s["ttft_attainment"] == pytest.approx(0.5) and s["tpot_attainment"] == pytest.approx(0.8)
    assert s["throughput_rps"] == pytest.approx(8 / 5) and s["output_tokens_per_s"] == pytest.approx(80 / 5)
    assert s["ttft_s"]["p50"] == pytest.approx(0.45)
    assert s["errors"] == {"HTTP 503: overloaded 1": 2}  # numbers masked when grouping
    json.dumps(s)  # serialisable as is


# ------------------------------------------------------------------------------------------ goodput


def test_goodput_from_sweep():
    assert goodput_from_sweep([(1, 1.0), (2, 0.95), (4, 0.8)], 0.9) == 2
    assert goodput_from_sweep([(4, 0.5), (1, 0.99)], 0.9) == 1  # order does not matter
    assert goodput_from_sweep([(1, 0.5), (2, 0.95)], 0.9) is None  # the lowest fails
    assert goodput_from_sweep([(1, 0.9), (2, 0.9)], 0.9) == 2  # the target itself passes
    assert goodput_from_sweep([(1, 1.0), (2, 0.5), (3, 0.95)], 0.9) == 1  # a noisy pass above a fail ignored


def attainment_curve(capacity: float):
    """A fake system: everything meets the SLO below `capacity` req/s, nothing above."""
    calls = []

    def evaluate(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= capacity else 0.2

    return evaluate, calls


def test_goodput_search_bisects_between_pass_and_fail():
    evaluate, calls = attainment_curve(5.3)
    res = goodput_search(evaluate, [2, 8], 0.9, steps=3)
    assert calls == [2, 8, 5, 6.5, 5.75]
    assert res.goodput == 5 and res.bracket == (5, 5.75)
    assert sorted(res.points) == [(2, 1.0), (5, 1.0), (5.75, 0.2), (6.5, 0.2), (8, 0.2)]


def test_goodput_search_without_search_is_the_sweep():
    evaluate, calls = attainment_curve(5.3)
    res = goodput_search(evaluate, [1, 2, 4, 8], 0.9, search=False)
    assert calls == [1, 2, 4, 8] and res.goodput == 4 and res.bracket == (4, 8)


def test_goodput_search_expands_up_and_down():
    evaluate, calls = attainment_curve(30)
    res = goodput_search(evaluate, [4], 0.9, steps=0, max_expand=4)
    assert calls == [4, 8, 16, 32] and res.goodput == 16 and res.bracket == (16, 32)

    evaluate, calls = attainment_curve(0.3)
    res = goodput_search(evaluate, [4], 0.9, steps=0, max_expand=5)
    assert calls == [4, 2, 1, 0.5, 0.25] and res.goodput == 0.25

    evaluate, calls = attainment_curve(0.001)
    res = goodput_search(evaluate, [1], 0.9, steps=2, max_expand=2)
    assert calls == [1, 0.5, 0.25] and res.goodput is None and res.bracket == (None, 0.25)

    evaluate, calls = attainment_curve(1e9)  # everything passes even after expanding: a lower bound
    res = goodput_search(evaluate, [1], 0.9, steps=3, max_expand=2)
    assert calls == [1, 2, 4] and res.goodput == 4 and res.bracket == (4, None)


def test_goodput_search_stops_at_tolerance():
    evaluate, calls = attainment_curve(10.2)
    res = goodput_search(evaluate, [10, 10.4], 0.9, steps=5, rel_tol=0.05)
    assert calls == [10, 10.4] and res.goodput == 10


# ------------------------------------------------------------------------------------------ traces


def test_trace_loading_and_rescaling(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([
        json.dumps({"timestamp": 1002.0, "input_len": 8, "output_len": 4}),
        "# a comment",
        json.dumps({"timestamp": 1000.0, "prompt": "hello there", "output_len": 2}),
        "",
        json.dumps({"timestamp": 1004.0, "input_len": 3, "output_len": 1}),
    ]))
    rows = load_trace(p)
    assert [row.arrival_s for row in rows] == [0.0, 2.0, 4.0]
    items = trace_schedule(rows, PromptMaker(1.0), random.Random(0))
    assert [i.at for i in items] == [0.0, 2.0, 4.0]
    assert items[0].prompt == "hello there" and len(items[1].prompt.split()) == 8
    fast = trace_schedule(rows, PromptMaker(1.0), random.Random(0), rate=5.0)  # 2 gaps in 0.4 s
    assert [i.at for i in fast] == pytest.approx([0.0, 0.2, 0.4])
    assert len(trace_schedule(rows, PromptMaker(1.0), random.Random(0), num_requests=2)) == 2
    assert len(trace_schedule(rows, PromptMaker(1.0), random.Random(0), duration=3.0)) == 2


def test_progress_lines_without_a_tty(capsys):
    import io

    out = io.StringIO()
    bar = Progress(3, "rate 1", stream=out, interval=0.0)
    bar.update(True)
    bar.update(False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "rate 1: 1/3 done (0s)" and "1 failed" in lines[-1] and "\r" not in out.getvalue()


# ------------------------------------------------------------------------------------------ CLI


def baton(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*BATON, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def test_unreachable_endpoint_is_one_line():
    port = free_port()
    res = baton("bench", "--url", f"http://127.0.0.1:{port}/v1", "--num-requests", "1")
    assert res.returncode == 1
    want = f"baton bench: error: cannot reach http://127.0.0.1:{port}/v1: connection failed: All connection attempts failed"
    assert res.stderr.strip().splitlines() == [want]


@pytest.mark.parametrize("flags,msg", [
    (["--rate", "0"], "--rate: must be greater than 0"),
    (["--slo-ttft", "500"], "--slo-ttft: expected a duration with a unit"),
    (["--input-len", "uniform:9:3"], "--input-len: uniform needs"),
    (["--url", "127.0.0.1:1"], "--url must start with http"),
    (["--goodput-search"], "--goodput-search needs --slo-ttft"),
])
def test_bad_flags_are_one_line(flags, msg):
    base = ["bench", "--url", "http://127.0.0.1:1/v1"]
    res = baton(*base, *flags)
    assert res.returncode == 1 and msg in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def worker_url(tiny_model_dir):
    with worker_process(tiny_model_dir, served_model_name="tiny") as base:
        yield base + "/v1"


@pytest.mark.integration
@pytest.mark.slow
def test_bench_against_a_real_worker(worker_url, tmp_path):
    out = tmp_path / "results.json"
    res = baton("bench", "--url", worker_url, "--rate", "20,40", "--num-requests", "12",
                "--input-len", "uniform:40:80", "--output-len", "uniform:4:8", "--slo-ttft", "10s",
                "--slo-tpot", "5s", "--output", str(out), "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "== rate 20: 12/12 completed" in res.stdout and "== rate 40: 12/12 completed" in res.stdout
    assert "TTFT  p50" in res.stdout and "TPOT  p50" in res.stdout and "output tok/s" in res.stdout
    assert "100.0% met both" in res.stdout
    assert "goodput: 40 req/s at >= 90% SLO attainment" in res.stdout
    assert "rate 20: 12/12 done" in res.stderr  # progress on stderr (no TTY: lines)
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["goodput"]["goodput_rps"] == 40
    for run in report["runs"]:
        reqs = run["requests"]
        assert len(reqs) == 12 and all(q["ok"] for q in reqs)
        # ignore_eos: exactly the asked lengths; the prompt length is the server's count, near the target
        assert all(q["output_len"] == q["expected_output_len"] for q in reqs)
        assert all(q["ttft"] > 0 and q["tpot"] > 0 and q["e2e"] >= q["ttft"] for q in reqs)
        mean_in = run["summary"]["input_tokens_mean"]
        assert 30 <= mean_in <= 100, mean_in
    # the same workload at both rates (only the arrival times differ)
    assert [q["output_len"] for q in report["runs"][0]["requests"]] == \
        [q["output_len"] for q in report["runs"][1]["requests"]]


@pytest.mark.integration
@pytest.mark.slow
def test_bench_trace_and_unknown_model(worker_url, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 0.05 * i, "input_len": 16, "output_len": 3}) + "\n"
                             for i in range(5)))
    res = baton("bench", "--url", worker_url, "--trace", str(trace), "--slo-ttft", "10s")
    assert res.returncode == 0, res.stderr
    assert "== rate trace: 5/5 completed" in res.stdout and "goodput" not in res.stdout
    res = baton("bench", "--url", worker_url, "--model", "nope", "--num-requests", "1")
    assert res.returncode == 1
    assert res.stderr.strip() == f"baton bench: error: model 'nope' is not served at {worker_url} (it serves: tiny)"
