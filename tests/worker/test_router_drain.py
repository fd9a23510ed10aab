"""A router process leaving on SIGTERM (`worker/router/drain.py`): with `--drain-timeout` it keeps serving through
the accept window (/ready 503), then refuses new connections and lets the stream in flight finish; without, or on
a second SIGTERM, it stops without waiting for the stream (aiohttp's own short graceful shutdown, then cut)."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
from baton.worker.local_fleet import free_port

from baton import launch

from .test_router import SSE_EVENT, Stub, _baton

EVENTS, EVERY = 16, 0.5  # a stream of 8 s: it outlasts the accept window


def slow(events: int = EVENTS):
    """A worker whose stream takes `events` x EVERY seconds; a plain request is answered at once."""
    return lambda request: _slow(request, events)


async def _slow(request, events: int):
    from aiohttp import web

    body = await request.json()
    if not body.get("stream"):
        return web.json_response({"id": "s", "object": "text_completion",
                                  "choices": [{"index": 0, "text": "quick", "finish_reason": "length"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(events):
        await resp.write(SSE_EVENT)
        await asyncio.sleep(EVERY)
    await resp.write(b"data: [DONE]\n\n")
    return resp


BODY = {"model": "m", "prompt": "hi", "max_tokens": 4}


class Streamer(threading.Thread):
    """One streamed completion through the router, in the background; keeps what arrived (or the error)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.error = url, b"", None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json={**BODY, "stream": True},
                              timeout=60) as resp:
                for chunk in resp.iter_bytes():
                    self.body += chunk
        except httpx.HTTPError as exc:
            self.error = exc


def _router(worker_url: str, *extra: str):
    port = free_port()
    proc = _baton("router", "--both", worker_url, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
                  *extra)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the router never became ready"
        time.sleep(0.1)


def _first_event(worker: Stub, streamer: Streamer) -> None:
    deadline = time.monotonic() + 10
    while not streamer.body:
        assert time.monotonic() < deadline and streamer.error is None, streamer.error
        time.sleep(0.02)


def test_sigterm_drains_the_stream_in_flight_and_serves_the_accept_window():
    worker = Stub(slow()).start()
    proc, url = _router(worker.base_url, "--drain-timeout", "30")
    try:
        streamer = Streamer(url)
        streamer.start()
        _first_event(worker, streamer)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # the accept window: out of rotation, still serving what kube-proxy sends before it learns
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"], ready.text
        late = httpx.post(url + "/v1/completions", json=BODY, timeout=10)
        assert late.status_code == 200 and late.json()["choices"][0]["text"] == "quick"
        # ... on a connection the client must not keep: its next request opens one (to another router)
        assert late.headers.get("connection", "").lower() == "close", late.headers
        # after it: no new connection, while the stream in flight goes on
        time.sleep(max(0.0, t0 + launch.DRAIN_ACCEPT_SECONDS + 1.0 - time.monotonic()))
        assert streamer.is_alive(), "the stream ended before the test could look"
        try:
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("a new connection was accepted after the accept window")
        except httpx.ConnectError:
            pass
        streamer.join(timeout=30)
        assert streamer.error is None, streamer.error
        assert streamer.body.count(b"data: {") == EVENTS and streamer.body.endswith(b"data: [DONE]\n\n")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert "draining" in out and "drain finished" in out, out[-3000:]
        assert time.monotonic() - t0 < EVENTS * EVERY + 5  # it left once the stream was done
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.stop()


def test_without_a_drain_timeout_or_on_a_second_sigterm_it_does_not_wait_for_the_stream():
    worker = Stub(slow(60)).start()  # a stream of 30 s: cut long before its end
    try:
        for extra, signals in (((), 1), (("--drain-timeout", "30"), 2)):
            proc, url = _router(worker.base_url, *extra)
            streamer = Streamer(url)
            streamer.start()
            _first_event(worker, streamer)
            t0 = time.monotonic()
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            out, _ = proc.communicate(timeout=30)
            assert time.monotonic() - t0 < 15, (extra, out[-2000:])  # not the drain's wait for the stream's 30 s
            streamer.join(timeout=30)
            assert not streamer.body.endswith(b"data: [DONE]\n\n"), extra  # cut: it did not wait for it
    finally:
        worker.stop()
