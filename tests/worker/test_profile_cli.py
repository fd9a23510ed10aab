"""`baton profile` on the tiny model: it times real forward passes, fits them, and the planner can read the file."""
from __future__ import annotations

import json

import pytest

from baton.cli import main
from baton.profile import ProfileSet


def test_profile_the_tiny_model_and_plan_with_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["profile", "--model", str(tiny_model_dir), "-o", str(out), "--threads", "1",
                 "--max-prompt", "256", "--repeats", "2", "--name", "tiny"]) == 0
    text = capsys.readouterr()
    assert "baton profile: prefill 1 x 16 tokens" in text.err and f"wrote {out}" in text.out
    ps = ProfileSet.load(out)
    prof = ps.for_model("tiny").get(1)
    # a longer prompt and a bigger batch cost more; the fit is positive where it was measured
    assert 0 < prof.prefill_s([16]) < prof.prefill_s([256]) < prof.prefill_s([256, 256])
    assert 0 < prof.decode_step_s(1, 32) < prof.decode_step_s(32, 32 * 256)
    assert prof.kv_capacity_tokens > 0 and prof.max_batch_tokens >= 256
    assert ps.engine == "baton" and "torch thread" in ps.hardware
    assert ps.for_model("tiny").kv_bytes_per_token > 0
    assert ps.extra["chunked_prefill"] is True and ps.for_model("tiny").chunked_prefill  # what a `both` worker runs
    # the planner reads it: a CPU "node" of 2 cores plans a fleet of the tiny model
    assert main(["plan", "--profile", str(out), "--input-len", "uniform:32:128", "--output-len", "16",
                 "--slo-ttft", "500ms", "--slo-tpot", "100ms", "--gpus-per-node", "2", "--quiet", "--json",
                 "--requests", "200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["gpus"] <= 2 and doc["instanceRPS"]["prefill"]["1"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["--model", "/nonexistent", "-o", "{tmp}/p.json"], "--model: "),
    (["--model", "{model}", "-o", "/nonexistent/dir/p.json"], "-o: folder /nonexistent/dir does not exist"),
    (["--model", "{model}", "-o", "{tmp}/p.json", "--threads", "0"], "--threads: must be at least 1"),
])
def test_profile_errors(argv, msg, tiny_model_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in argv]
    assert main(["profile", *argv]) == 1
    assert msg in capsys.readouterr().err
