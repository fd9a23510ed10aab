"""A poll timeout for NIXL's progress thread, for every NIXL agent a process creates: Baton's own workers
(`kv/nixl.py`) and vLLM's (`vllm_cli.py`).

NIXL's progress thread (its UCX backend) waits for its workers' events with poll(), whose timeout is the agent's
`pthrDelay` (microseconds); NIXL's Python API sets it to 0 for every agent (`nixl/_api.py`, NIXL 1.5), so the
thread never sleeps: a whole core per process that holds an agent, idle or busy (measured: 98-100 % of a core
per vLLM process with a KV connector; 60-75 % per idle Baton worker with `--kv-transport auto` where NIXL is
installed). Events still wake the thread at once; the timeout is only its fallback for transports that need a
periodic poll. `BATON_NIXL_PROGRESS_DELAY_US=0` keeps NIXL's busy polling.

Stdlib only: it runs under vLLM's interpreter too (the vLLM image copies it beside `vllm_cli.py`).
"""
from __future__ import annotations

import os

ENV = "BATON_NIXL_PROGRESS_DELAY_US"
DEFAULT_DELAY_US = 1000


class BadDelay(ValueError):
    """`BATON_NIXL_PROGRESS_DELAY_US` is not a whole number of microseconds >= 0 (the message says so)."""


def delay_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> int:
    """The floor in microseconds: the environment's value, else DEFAULT_DELAY_US. BadDelay names the variable."""
    raw = (os.environ if environ is None else environ).get(ENV, str(DEFAULT_DELAY_US)).strip()
    try:
        delay = int(raw)
    except ValueError:
        raise BadDelay(f"{ENV}={raw!r}: want a whole number of microseconds (0 = NIXL's busy polling)") from None
    if delay < 0:
        raise BadDelay(f"{ENV}={raw!r}: want a whole number of microseconds >= 0 (0 = NIXL's busy polling)")
    return delay


def calm_nixl_progress_thread(api, delay_us: int) -> bool:
    """Make every NIXL agent this process creates use a progress-thread poll timeout of at least `delay_us`:
    `api` is NIXL's `nixl._api` module, whose agent sets `nixlAgentConfig().pthrDelay = 0`; its config class is
    replaced by a subclass that raises that value. True when patched (once per process; later calls keep the
    first floor)."""
    bind = api.nixlBind
    base = bind.nixlAgentConfig
    if delay_us <= 0 or getattr(base, "baton_min_delay_us", None) is not None:
        return False

    class AgentConfig(base):
        baton_min_delay_us = delay_us

        def __setattr__(self, name, value):
            if name == "pthrDelay":
                value = max(int(value), delay_us)
            super().__setattr__(name, value)

    bind.nixlAgentConfig = AgentConfig
    return True
