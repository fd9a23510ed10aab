"""The operator's own per-LLMService loops (operator/service_loops.py): started and stopped from watch events,
no kopf timer or daemon (each would put a finalizer on the LLMService)."""
from __future__ import annotations

import asyncio

import pytest
from baton.operator import service_loops
from baton.operator.service_loops import NOT_WANTED, ServiceLoops, StopFlag


class Recorder:
    """A loop that counts its rounds and records how it ended."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.ended: list[str] = []

    async def __call__(self, namespace: str, name: str, memo: dict, stopped: StopFlag) -> None:
        self.started.append((namespace, name))
        memo["rounds"] = memo.get("rounds", 0)
        while not await stopped.wait(0.01):
            memo["rounds"] += 1
        self.ended.append(stopped.reason)


def test_want_starts_the_missing_loops_and_stops_the_others():
    async def scenario() -> None:
        a, b = Recorder(), Recorder()
        loops = ServiceLoops({"a": a, "b": b})
        loops.want("ns", "svc", {"a", "b"})
        loops.want("ns", "svc", {"a", "b"})  # every watch event asks again: nothing starts twice
        await asyncio.sleep(0.05)
        assert loops.running("ns", "svc") == {"a", "b"}
        assert a.started == [("ns", "svc")] and b.started == [("ns", "svc")]
        stopped = loops.want("ns", "svc", {"a"})
        await asyncio.wait_for(asyncio.gather(*stopped), 2)
        assert b.ended == [NOT_WANTED] and a.ended == []
        assert loops.running("ns", "svc") == {"a"}
        assert loops.memo("ns", "svc")["rounds"] > 0  # the memo stays while the LLMService exists
        await asyncio.wait_for(asyncio.gather(*loops.forget("ns", "svc")), 2)
        assert loops.running("ns", "svc") == set()
        assert "rounds" not in loops.memo("ns", "svc")  # deleted: its memo went with it

    asyncio.run(scenario())


def test_loops_of_two_services_are_independent():
    async def scenario() -> None:
        a = Recorder()
        loops = ServiceLoops({"a": a})
        loops.want("ns", "one", {"a"})
        loops.want("other", "one", {"a"})
        await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*loops.forget("ns", "one")), 2)
        assert loops.running("other", "one") == {"a"}
        await loops.stop_all()
        assert a.ended == [NOT_WANTED, "operator shutting down"]

    asyncio.run(scenario())


def test_a_loop_that_ignores_its_flag_is_cancelled(monkeypatch):
    monkeypatch.setattr(service_loops, "CANCELLATION_TIMEOUT", 0.05)
    cancelled = []

    async def stubborn(namespace: str, name: str, memo: dict, stopped: StopFlag) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(stopped.reason)
            raise

    async def scenario() -> None:
        loops = ServiceLoops({"s": stubborn})
        loops.want("ns", "svc", {"s"})
        await asyncio.sleep(0.01)
        await asyncio.wait_for(loops.stop_all(timeout=0.05), 2)

    asyncio.run(scenario())
    assert cancelled == ["operator shutting down"]


def test_a_failed_loop_is_started_again_by_the_next_event():
    async def scenario() -> None:
        runs = []

        async def flaky(namespace: str, name: str, memo: dict, stopped: StopFlag) -> None:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("boom")
            await stopped.wait()

        loops = ServiceLoops({"f": flaky})
        loops.want("ns", "svc", {"f"})
        await asyncio.sleep(0.01)
        assert loops.running("ns", "svc") == set()  # it died (logged)
        loops.want("ns", "svc", {"f"})
        await asyncio.sleep(0.01)
        assert loops.running("ns", "svc") == {"f"} and len(runs) == 2
        await loops.stop_all()

    asyncio.run(scenario())


def test_an_unknown_loop_is_refused_by_name():
    async def scenario() -> None:
        with pytest.raises(ValueError, match="unknown loops \\['nope'\\]"):
            ServiceLoops({"a": Recorder()}).want("ns", "svc", {"nope"})

    asyncio.run(scenario())


def test_the_handlers_ask_kopf_for_no_finalizer():
    """The point of service_loops: kopf adds its finalizer to an LLMService for a timer, a daemon or a
    non-optional deletion handler (`requires_finalizer`); none of Baton's handlers may be one."""
    import kopf
    from baton.operator import handlers

    registry = kopf.get_default_registry()
    mine = [h for reg in (registry._spawning, registry._changing) for h in reg._handlers
            if getattr(h, "fn", None) is not None and h.fn.__module__ == handlers.__name__]
    assert mine, "no Baton handler found in kopf's registry"
    needing = [h.id for h in mine if h.requires_finalizer]
    assert not needing, f"these handlers make kopf put a finalizer on every LLMService: {needing}"
    assert not registry._spawning._handlers, [h.id for h in registry._spawning._handlers]  # no timers/daemons


def test_wanted_loops_follow_the_spec():
    from baton.operator.handlers import wanted_loops

    assert wanted_loops({}) == {"resync"}
    assert wanted_loops({"planner": {"mode": "apply"}}) == {"resync", "planner"}
    assert wanted_loops({"planner": {"mode": "off"}, "autoscaling": {"mode": "baton"}}) == {"resync", "autoscaler"}
