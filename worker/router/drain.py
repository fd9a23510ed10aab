"""How a router pod leaves: a drain on SIGTERM, so that a rollout or a scale-down of the routers fails no request.

Kubernetes removes a terminating pod from its Service's endpoints while it sends the SIGTERM, and kube-proxy on
every node learns of it a moment later: connections opened meanwhile still reach the old pod. A router that
stopped listening at once refused them (the client saw a connection error), and cut the streams it was
relaying. With `--drain-timeout` > 0 (the operator renders it) the router instead:

1. keeps serving for `launch.DRAIN_ACCEPT_SECONDS` with `/ready` answering 503 (`draining`), the window in
   which the endpoint removal reaches the nodes; every response then says `Connection: close`, so a client's
   kept-alive connection is not reused (its next request opens a new one, which reaches another router) --
   else an idle connection closed at exit races the client's next request on it;
2. stops accepting connections and lets the requests in flight -- streams included -- finish, for up to the
   drain timeout (`launch.STREAM_DRAIN_SECONDS` as rendered: a decode stream is what a router relays);
3. exits. The pod's grace period covers all of it (`launch.router_termination_grace_seconds`).

A second SIGTERM, or Ctrl-C, stops at once. Without a drain timeout (local fleets, a developer's terminal) the
router stops at once, as before.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from baton import launch

log = logging.getLogger("baton.router")

#: How often the drain looks at the requests in flight, and reports them.
POLL_SECONDS = 0.1
REPORT_SECONDS = 10.0


@dataclass
class DrainState:
    """Requests in flight on the API port (a stream counts until its last byte) and whether a drain began."""

    active: int = 0
    draining: bool = False


DRAIN_KEY = web.AppKey("baton_router_drain", DrainState)


def close_while_draining(state: DrainState):
    """aiohttp `on_response_prepare` handler: during a drain, responses close their connection (step 1)."""

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        if state.draining:  # runs after aiohttp chose the Connection header: say it, and close after it
            response.force_close()
            response.headers["Connection"] = "close"

    return prepare


def counting_middleware(state: DrainState):
    """aiohttp middleware: counts the requests in flight in `state.active` (an aiohttp handler returns once its
    response, streamed or not, is written)."""

    @web.middleware
    async def count(request: web.Request, handler):
        state.active += 1
        try:
            return await handler(request)
        finally:
            state.active -= 1

    return count


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `event` is set; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return event.is_set()
    return True


async def drain(state: DrainState, runner: web.AppRunner, stop: asyncio.Event, timeout: float,
                accept_seconds: float = launch.DRAIN_ACCEPT_SECONDS) -> None:
    """Steps 1 and 2 of the module docstring; returns when the router may exit (the caller cleans up). `stop`
    set (a second signal) ends the drain at once."""
    state.draining = True
    log.info("SIGTERM: draining -- /ready answers 503, still serving for %gs, then up to %gs for the %d "
             "request(s) in flight", accept_seconds, timeout, state.active)
    if await _wait(stop, accept_seconds):
        log.warning("stopped at once by a second signal; %d request(s) in flight were cut", state.active)
        return
    for site in list(runner.sites):
        await site.stop()  # no new connections; those open keep being served
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + REPORT_SECONDS
    while state.active and time.monotonic() < deadline:
        if await _wait(stop, POLL_SECONDS):
            log.warning("stopped at once by a second signal; %d request(s) in flight were cut", state.active)
            return
        if time.monotonic() >= next_report:
            log.info("draining: %d request(s) in flight", state.active)
            next_report += REPORT_SECONDS
    if state.active:
        log.warning("drain timeout (%gs): %d request(s) in flight are cut", timeout, state.active)
    else:
        log.info("drain finished; router stopped")
