"""The shared workload model (baton/workload.py): lengths, arrivals, the one trace schema, the one percentile."""
from __future__ import annotations

import json
import math
import random

import pytest

from baton.workload import (
    LengthDist,
    Request,
    Workload,
    attainment,
    dump_trace,
    load_trace,
    percentile,
    poisson_arrivals,
    poisson_requests,
    rescale,
)


def test_length_dist_parse_and_str():
    assert LengthDist.parse("128") == LengthDist("fixed", 128)
    assert str(LengthDist.parse("uniform:32:64")) == "uniform:32:64"
    assert str(LengthDist.parse("lognormal:800:200")) == "lognormal:800:200"
    for bad in ("0", "uniform:10:5", "uniform:10", "lognormal:-1:3", "normal:3:4", "abc"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_length_sampling():
    rng = random.Random(1)
    assert {LengthDist.parse("7").sample(rng) for _ in range(10)} == {7}
    u = LengthDist.parse("uniform:5:9")
    xs = [u.sample(rng) for _ in range(2000)]
    assert min(xs) == 5 and max(xs) == 9 and set(xs) == {5, 6, 7, 8, 9}
    ln = LengthDist.parse("lognormal:800:200")
    xs = [ln.sample(rng) for _ in range(20000)]
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    assert mean == pytest.approx(800, rel=0.02) and sd == pytest.approx(200, rel=0.05)
    clipped = LengthDist("lognormal", 800, 200, maximum=900)
    assert max(clipped.sample(rng) for _ in range(2000)) == 900
    assert LengthDist("lognormal", 1, 0).sample(rng) == 1


def test_poisson_arrivals():
    rng = random.Random(0)
    ts = poisson_arrivals(10.0, rng, num_requests=5000)
    assert len(ts) == 5000 and ts == sorted(ts)
    assert len(ts) / ts[-1] == pytest.approx(10.0, rel=0.05)  # mean rate
    gaps = [b - a for a, b in zip([0.0, *ts], ts)]
    cv = math.sqrt(sum((g - 0.1) ** 2 for g in gaps) / len(gaps)) / 0.1
    assert cv == pytest.approx(1.0, rel=0.1)  # exponential gaps: sd == mean
    by_time = poisson_arrivals(10.0, random.Random(0), duration=3.0)
    assert by_time and by_time[-1] <= 3.0 and by_time == ts[: len(by_time)]
    both = poisson_arrivals(10.0, random.Random(0), num_requests=3, duration=100.0)
    assert len(both) == 3
    assert poisson_arrivals(math.inf, rng, num_requests=4) == [0.0] * 4
    with pytest.raises(ValueError):
        poisson_arrivals(1.0, rng)


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    xs = [rng.random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0


@pytest.mark.parametrize("line,msg", [
    ("nope", "not JSON"),
    ('{"timestamp": 1}', "numeric timestamp and output_len"),
    ('{"timestamp": 1, "output_len": 2}', "prompt or input_len"),
    ('{"timestamp": 1, "output_len": 0, "input_len": 3}', "output_len must be"),
    ("[1, 2]", "JSON object"),
])
def test_trace_errors_name_the_line(tmp_path, line, msg):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_len": 1, "output_len": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:2: .*{msg}"):
        load_trace(p)


def test_lognormal_with_clip_parses_and_prints():
    d = LengthDist.parse("lognormal:755:700:4:1536", flag="--input-len")
    assert (d.minimum, d.maximum, d.upper) == (4, 1536, 1536)
    assert str(d) == "lognormal:755:700:4:1536"
    rng = random.Random(0)
    xs = [d.sample(rng) for _ in range(5000)]
    assert min(xs) >= 4 and max(xs) == 1536
    with pytest.raises(ValueError, match="--input-len: lognormal needs 1 <= MIN <= MAX"):
        LengthDist.parse("lognormal:10:1:5:2", flag="--input-len")


def test_trace_round_trip_and_unknown_fields(tmp_path):
    reqs = [Request(0.0, 12, 3), Request(0.25, 7, 9, prompt="hi there")]
    p = tmp_path / "t.jsonl"
    dump_trace(reqs, p)
    assert load_trace(p) == reqs
    # the simulator's old schema is refused with the fields a line must have
    p.write_text(json.dumps({"t": 0, "prompt_tokens": 3, "output_tokens": 2}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: unknown field\(s\) output_tokens, prompt_tokens, t"):
        load_trace(p)


def test_rescale_and_seeded_workloads():
    reqs = [Request(0.0, 1, 1), Request(1.0, 1, 1), Request(4.0, 1, 1)]
    assert [r.arrival_s for r in rescale(reqs, 2.0)] == pytest.approx([0.0, 0.25, 1.0])
    assert [r.arrival_s for r in rescale(reqs, math.inf)] == [0.0, 0.0, 0.0]
    w = Workload(1.0, LengthDist.parse("uniform:10:20"), LengthDist.parse("lognormal:50:10"))
    a, b = w.requests(200, seed=3), w.requests(200, seed=3, rate=4.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(r.prompt_tokens, r.output_tokens) for r in b]
    assert [r.arrival_s for r in a] == pytest.approx([4 * r.arrival_s for r in b])
    steps = poisson_requests([(0, 10.0), (10, 0.0)], 20.0, w.prompt, w.output, seed=1)
    assert steps and all(r.arrival_s < 10 for r in steps)


def test_attainment_counts_missing_as_misses():
    assert attainment([0.1, 0.2, None, 0.5], 0.2) == 0.5
    assert attainment([0.1], 0.2, total=4) == 0.25
    assert attainment([], 1.0) == 1.0
