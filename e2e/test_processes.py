"""Unit tests of the system tests' own helpers: `wait_for` (the one way they wait on a condition) and a component's
CPU count (no cluster)."""

from __future__ import annotations

import itertools

import pytest
from baton.e2e import processes
from baton.e2e.processes import poll_pauses, wait_for


def test_default_pauses_start_short_and_settle_at_a_second():
    pauses = list(itertools.islice(poll_pauses(), 12))
    assert pauses[0] == processes.POLL_FIRST
    assert pauses == sorted(pauses) and pauses[-1] == processes.POLL_MAX
    assert len([p for p in pauses if p < processes.POLL_MAX]) <= 6  # a long wait polls about once a second


def test_a_given_interval_is_kept():
    assert list(itertools.islice(poll_pauses(2.0), 4)) == [2.0] * 4


def test_a_long_wait_polls_about_once_a_second(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(processes.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(processes.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    polls = []
    with pytest.raises(AssertionError, match="timed out after 60s waiting for the pod"):
        wait_for("the pod", lambda: polls.append(clock[0]), timeout=60)
    assert 60 <= len(polls) <= 70, len(polls)  # a fixed 0.3 s poll made 200
    assert polls[-1] == 60  # one last look at the deadline


def test_a_condition_met_at_once_returns_at_once_and_exceptions_mean_not_yet(monkeypatch):
    assert wait_for("x", lambda: "yes", timeout=0) == "yes"  # looked at once even with no time left
    answers = iter([KeyError("not there"), None, "there"])

    def check():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    slept: list[float] = []
    monkeypatch.setattr(processes.time, "sleep", slept.append)
    assert wait_for("y", check, timeout=5) == "there"
    assert slept == [processes.POLL_FIRST, processes.POLL_FIRST * processes.POLL_GROWTH]  # no wall-clock bound


def test_a_component_reports_the_cpu_it_used(tmp_path):
    import subprocess
    import sys

    from baton.e2e.cluster import Component

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(60)"
    c = Component("busy", [sys.executable, "-c", busy], tmp_path / "log")
    assert c.cpu_seconds() is None  # not started
    c.proc = subprocess.Popen(c.argv)
    try:
        assert wait_for("0.5 CPU-s used", lambda: (c.cpu_seconds() or 0) >= 0.5, timeout=30)
    finally:
        c.proc.kill()
        c.proc.wait()
    assert c.cpu_seconds() is None  # stopped
