"""The operator's own per-LLMService background loops: the resync safety net, the autoscaler, the planner.

Why not kopf's timers and daemons: kopf puts its finalizer on every object that has a timer or a daemon (it must
stop them before the object goes; kopf#1088), and a finalizer is a promise that this operator can still write
the object when it is deleted. A namespaced operator breaks that promise when its namespace is deleted: the
namespace controller may remove the operator's RoleBinding before the LLMService, the finalizer can no longer be
removed, and the namespace stays Terminating forever. Baton needs no finalizer (children go with their owner
references), so the loops are plain asyncio tasks of this process, started and stopped from the LLMService's
watch events: a `DELETED` event stops them; nothing blocks the deletion.

Each loop gets a `StopFlag` (the part of kopf's `DaemonStopped` the loops use: falsy while running, and an
interruptible `wait`) and a per-LLMService memo that outlives a loop switched off and on again only where the
loop wants it to (`forget` drops it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("baton.operator")

Key = tuple[str, str]  # (namespace, name)
#: a loop: (namespace, name, that LLMService's memo, its stop flag) -> runs until the flag is set
Loop = Callable[[str, str, dict[str, Any], "StopFlag"], Awaitable[None]]

#: the stop reason when a spec no longer asks for a loop (the autoscaler then forgets its history)
NOT_WANTED = "not asked for any more"
#: how long a stopped loop may take to notice its flag before it is cancelled (kopf's daemons had the same)
CANCELLATION_TIMEOUT = 10.0


class StopFlag:
    """Set once, when the loop should end; `wait(timeout)` sleeps until then or the timeout, whichever first."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason = ""

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self._event.is_set()


class ServiceLoops:
    """Which loops run for which LLMService; `want` is called on every watch event with the loops its spec
    asks for, and starts the missing ones and stops the ones no longer asked for."""

    def __init__(self, loops: dict[str, Loop]) -> None:
        self._loops = loops
        self._running: dict[tuple[Key, str], tuple[asyncio.Task, StopFlag]] = {}
        self._memos: dict[Key, dict[str, Any]] = {}

    def memo(self, namespace: str, name: str) -> dict[str, Any]:
        return self._memos.setdefault((namespace, name), {})

    def running(self, namespace: str, name: str) -> set[str]:
        return {loop for (key, loop), (task, _) in self._running.items()
                if key == (namespace, name) and not task.done()}

    def want(self, namespace: str, name: str, loops: set[str]) -> list[asyncio.Task]:
        """Start the loops in `loops` that do not run for this LLMService, stop the others. Returns the tasks
        of the loops it stopped (awaitable, for tests and shutdown)."""
        unknown = loops - self._loops.keys()
        if unknown:
            raise ValueError(f"unknown loops {sorted(unknown)}; known: {sorted(self._loops)}")
        key = (namespace, name)
        stopped = [self._stop(key, loop, NOT_WANTED) for loop in self._loops if loop not in loops]
        for loop in sorted(loops):
            entry = self._running.get((key, loop))
            if entry is None or entry[0].done():
                flag = StopFlag()
                task = asyncio.get_running_loop().create_task(
                    self._guarded(loop, namespace, name, flag), name=f"baton-{loop}-{namespace}/{name}")
                self._running[(key, loop)] = (task, flag)
        return [t for t in stopped if t is not None]

    def forget(self, namespace: str, name: str) -> list[asyncio.Task]:
        """The LLMService is gone: stop all its loops and drop its memo."""
        tasks = self.want(namespace, name, set())
        self._memos.pop((namespace, name), None)
        return tasks

    async def stop_all(self, timeout: float = CANCELLATION_TIMEOUT) -> None:
        """Operator shutdown: ask every loop to stop, cancel the ones still running after `timeout`."""
        tasks = [t for t in (self._stop(key, loop, "operator shutting down") for key, loop in list(self._running))
                 if t is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _stop(self, key: Key, loop: str, reason: str) -> asyncio.Task | None:
        entry = self._running.pop((key, loop), None)
        if entry is None or entry[0].done():
            return None
        task, flag = entry
        flag.set(reason)
        asyncio.get_running_loop().call_later(CANCELLATION_TIMEOUT, task.cancel)  # no-op once it has ended
        return task

    async def _guarded(self, loop: str, namespace: str, name: str, flag: StopFlag) -> None:
        try:
            await self._loops[loop](namespace, name, self.memo(namespace, name), flag)
        except asyncio.CancelledError:
            log.warning("%s/%s: the %s loop did not stop within %.0f s; cancelled", namespace, name, loop,
                        CANCELLATION_TIMEOUT)
            raise
        except Exception:  # a loop that dies is restarted by the next watch event
            log.exception("%s/%s: the %s loop failed", namespace, name, loop)


__all__ = ["CANCELLATION_TIMEOUT", "NOT_WANTED", "Loop", "ServiceLoops", "StopFlag"]
