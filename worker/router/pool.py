"""The router's view of its workers: endpoints per role, their health and in-flight counts.

Membership comes from discovery (`discovery.py`: static lists or Kubernetes Endpoints) through
`Pool.set_urls`; health from a periodic `GET <health path>` per endpoint (`HealthChecker`; `/ready` for
Baton's workers, `/health` for vLLM's, which serve no `/ready`) and, passively, from hops that fail.

Health is judged like the kubelet judges readiness, with the launch contract's `WORKER_READINESS`: a check
that gets no answer in time (or a hop that times out) is a *missed* check, and only `failure_threshold` of
them in a row take a worker out -- a busy worker on a loaded node that misses one check is not dead. A worker
that answers "not ready" (a draining Baton worker's 503) or refuses the connection is believed at once: that
is evidence, not silence. `success_threshold` passing checks bring a worker back.

Load: each endpoint counts the requests this router has in flight there (`inflight`). After a passing health
check the checker also reads the worker's own queue from its `/metrics` -- `vllm:num_requests_running` +
`vllm:num_requests_waiting`, which vLLM and Baton's workers both export -- so `Endpoint.load` also sees
requests other router replicas (or clients going around the router) sent it. A worker without those series
(404, or none in the text) is not scraped again; the policies then use `inflight` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable

import aiohttp
from baton.worker.router.hops import describe

from baton import launch

log = logging.getLogger("baton.router.pool")

ROLES = ("prefill", "decode", "both")

#: The path the health checks GET on every worker (`--health-path`): Baton's workers answer `/ready`
#: (200 once the engine can serve); a vLLM fleet is rendered with `--health-path /health`. From the launch
#: contract, like every path a probe or a peer uses.
DEFAULT_HEALTH_PATH = launch.probes(launch.ENGINE_BATON).readiness
METRICS_PATH = launch.METRICS_PATH
#: a worker's own queue (vLLM's names; Baton's workers export the same): sums over label sets (engines)
LOAD_SERIES = (launch.Metric.NUM_REQUESTS_RUNNING, launch.Metric.NUM_REQUESTS_WAITING)
_LOAD_LINE = re.compile(rb"^(" + b"|".join(re.escape(n.encode()) for n in LOAD_SERIES)
                        + rb")(?:\{[^}]*\})?[ \t]+([-+0-9.eEinfINFaN]+)", re.MULTILINE)


def parse_load(text: bytes) -> int | None:
    """running + waiting requests from a Prometheus text exposition; None when neither series is there."""
    total, seen = 0.0, False
    for m in _LOAD_LINE.finditer(text):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            total += value
            seen = True
    return int(total) if seen else None


def parse_fingerprint(body: bytes, header: str | None = None) -> str | None:
    """A worker's KV-layout fingerprint from its readiness answer: `launch.READY_KV_FINGERPRINT` of a JSON body
    (Baton's /ready), else the `launch.Header.KV_FINGERPRINT` header; None when neither says (vLLM's /health
    answers 200 with an empty body): unknown."""
    value = None
    if body[:1] == b"{":
        try:
            value = json.loads(body).get(launch.READY_KV_FINGERPRINT)
        except (ValueError, AttributeError):
            value = None
    if not isinstance(value, str) or not value.strip():
        value = header
    return value.strip() if isinstance(value, str) and value.strip() else None


def validate_health_path(path: str) -> str:
    """`path` if it can be appended to a worker URL; ValueError otherwise. A path without its leading
    slash would be glued to the port (`http://w:8000ready`) and every worker would look dead."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must start with '/' (e.g. /ready, or /health for vLLM workers)")
    if any(c.isspace() or not c.isprintable() for c in path):
        raise ValueError(f"{path!r} must not contain spaces or control characters")
    return path


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("empty worker URL")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f"bad worker URL {url!r} (expected http://HOST:PORT)")
    return url


#: What the router counts a worker's health with (the kubelet's readiness numbers, from the launch contract).
DEFAULT_HEALTH = launch.WORKER_READINESS


class Endpoint:
    __slots__ = ("_on_change", "checked_at", "engine_load", "fingerprint", "healthy", "inflight", "last_error",
                 "missed", "passed", "role", "scrape_load", "timing", "url")

    def __init__(self, url: str, role: str, on_change: Callable[[Endpoint], None] | None = None,
                 timing: launch.HealthTiming = DEFAULT_HEALTH) -> None:
        self.url = url
        self.role = role
        self.inflight = 0
        self.healthy = False  # until the first check passes
        self.last_error: str | None = "not checked yet"
        self.checked_at = 0.0
        self.missed = 0  # checks (or hops) in a row that got no answer
        self.passed = 0  # passing checks in a row
        self.timing = timing
        self.engine_load: int | None = None  # running + waiting as the worker last reported it
        self.scrape_load = True  # False once the worker showed it exports no load series
        #: its KV-layout fingerprint from its last passing check (`parse_fingerprint`); None: unknown (a vLLM
        #: worker, whose /health has no body), which pairs with any (`pairing.py`)
        self.fingerprint: str | None = None
        self._on_change = on_change

    @property
    def load(self) -> int:
        """What the policies compare: this router's in-flight count, or the worker's own queue when that is
        larger (requests of other routers; it lags by up to one health interval)."""
        if self.engine_load is None:
            return self.inflight
        return max(self.inflight, self.engine_load)

    def acquire(self) -> None:
        self.inflight += 1
        if self._on_change is not None:
            self._on_change(self)

    def release(self) -> None:
        self.inflight -= 1
        if self._on_change is not None:
            self._on_change(self)

    def mark(self, healthy: bool, error: str | None = None) -> None:
        """A definite answer: healthy (a passing check; `success_threshold` in a row make an unhealthy worker
        healthy) or not (the worker said so, or refused the connection: unhealthy at once)."""
        self.checked_at = time.monotonic()
        self.missed = 0
        if healthy:
            self.passed += 1
            if not self.healthy and self.passed >= self.timing.success_threshold:
                self._set(True, None)
            elif self.healthy:
                self.last_error = None
        else:
            self.passed = 0
            self._set(False, error)

    def miss(self, error: str) -> None:
        """No answer in time (a check or a hop timed out): unhealthy only after `failure_threshold` in a row. A
        worker that was never healthy stays unhealthy; one that is busy keeps its traffic."""
        self.checked_at = time.monotonic()
        self.passed = 0
        self.missed += 1
        if not self.healthy or self.missed >= self.timing.failure_threshold:
            self._set(False, error if self.missed == 1 else f"{error} ({self.missed} checks in a row)")
        else:
            log.info("%s worker %s missed a check (%d of %d before it is dropped): %s", self.role, self.url,
                     self.missed, self.timing.failure_threshold, error)

    def fail(self, exc: BaseException) -> None:
        """A hop or check that failed with `exc`: a refused or unreachable connection is a definite answer
        (`mark`), anything else (a timeout, a connection cut while the worker computes) a missed answer."""
        if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
            self.mark(False, describe(exc))
        else:
            self.miss(describe(exc))

    def _set(self, healthy: bool, error: str | None) -> None:
        if healthy != self.healthy:
            if healthy:
                log.info("%s worker %s is healthy", self.role, self.url)
            else:
                log.warning("%s worker %s is unhealthy: %s", self.role, self.url, error)
        self.healthy = healthy
        self.last_error = error

    def __repr__(self) -> str:
        return f"Endpoint({self.role} {self.url} inflight={self.inflight} healthy={self.healthy})"


class Pool:
    """Endpoints of the three roles; `healthy(role)` is what the policies choose from."""

    def __init__(self, on_change: Callable[[Endpoint], None] | None = None,
                 on_remove: Callable[[Endpoint], None] | None = None,
                 timing: launch.HealthTiming = DEFAULT_HEALTH) -> None:
        self.endpoints: dict[str, dict[str, Endpoint]] = {r: {} for r in ROLES}
        self._on_change = on_change
        self._on_remove = on_remove
        self.timing = timing

    def set_urls(self, role: str, urls: Iterable[str]) -> list[Endpoint]:
        """Replace the membership of `role`; returns the endpoints that are new (to be checked at once)."""
        wanted = [normalize_url(u) for u in urls]
        current = self.endpoints[role]
        added = []
        for url in wanted:
            if url not in current:
                current[url] = Endpoint(url, role, self._on_change, self.timing)
                added.append(current[url])
                log.info("discovered %s worker %s", role, url)
        for url in list(current):
            if url not in wanted:
                ep = current.pop(url)
                log.info("%s worker %s is gone", role, url)
                if self._on_remove is not None:
                    self._on_remove(ep)
        return added

    def all(self) -> list[Endpoint]:
        return [ep for role in ROLES for ep in self.endpoints[role].values()]

    def healthy(self, role: str, exclude: Iterable[Endpoint] = ()) -> list[Endpoint]:
        skip = {id(e) for e in exclude}
        return [ep for ep in self.endpoints[role].values() if ep.healthy and id(ep) not in skip]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per role: workers known, checked at least once, and healthy now -- what the router's `/ready`
        reports (`all_workers_seen`)."""
        return {role: {"total": len(eps), "checked": sum(ep.checked_at > 0 for ep in eps.values()),
                       "healthy": len(self.healthy(role))} for role, eps in self.endpoints.items()}

    def ready(self) -> tuple[bool, str]:
        """Whether the router can answer a request now. A healthy decode (or both) worker is enough:
        without a healthy prefill worker the decode worker recomputes the prompt (slower, still correct),
        so a fleet whose prefill workers are all down must stay in its Service rather than go dark."""
        if self.healthy("both") or self.healthy("decode"):
            return True, "ok"
        counts = ", ".join(
            f"{role}: {len(self.healthy(role))}/{len(self.endpoints[role])} healthy" for role in ROLES
        )
        return False, f"need a healthy decode or both worker ({counts})"


class HealthChecker:
    """GET `path` on every endpoint each `interval` seconds (and at once on new endpoints); 200 is healthy,
    another status unhealthy at once, no answer within `timeout` a missed check (`Endpoint.miss`). The path
    depends on the engine (`DEFAULT_HEALTH_PATH` for Baton's workers, `/health` for vLLM's)."""

    def __init__(self, pool: Pool, session: aiohttp.ClientSession,
                 interval: float = launch.ROUTER_HEALTH_INTERVAL_SECONDS,
                 timeout: float = DEFAULT_HEALTH.timeout_seconds, path: str = DEFAULT_HEALTH_PATH,
                 load_metrics: bool = True) -> None:
        self.pool = pool
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.path = validate_health_path(path)
        self.load_metrics = load_metrics
        self._task: asyncio.Task | None = None

    async def check(self, ep: Endpoint) -> None:
        try:
            async with self.session.get(ep.url + self.path, timeout=self.timeout) as resp:
                body = await resp.read()
                if resp.status == 200:
                    fingerprint = parse_fingerprint(body, resp.headers.get(launch.Header.KV_FINGERPRINT))
                    if fingerprint != ep.fingerprint:
                        log.info("%s worker %s reports KV-layout fingerprint %s", ep.role, ep.url, fingerprint)
                    ep.fingerprint = fingerprint
                    ep.mark(True)
                else:
                    ep.mark(False, f"{self.path} answered {resp.status}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure counts against the worker
            ep.fail(exc)
        if self.load_metrics and ep.scrape_load:
            if ep.healthy:
                await self.read_load(ep)
            else:
                ep.engine_load = None

    async def read_load(self, ep: Endpoint) -> None:
        """The worker's own running + waiting requests from its /metrics (see the module docstring)."""
        try:
            async with self.session.get(ep.url + METRICS_PATH, timeout=self.timeout) as resp:
                body = await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a load reading is optional; health is decided above
            ep.engine_load = None
            return
        load = parse_load(body) if status == 200 else None
        if load is None and status in (200, 404):
            ep.scrape_load = False  # it has no such series: do not ask again
        ep.engine_load = load

    async def check_all(self, endpoints: Iterable[Endpoint] | None = None) -> None:
        eps = list(self.pool.all() if endpoints is None else endpoints)
        if eps:
            await asyncio.gather(*(self.check(ep) for ep in eps))

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="baton-router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def all_workers_seen(ready_body: object, *, healthy: bool = True) -> bool:
    """Whether a router's `/ready` body says every worker it knows of is healthy (`healthy=False`: has been
    checked at least once, healthy or not). The router is Ready (200) once one decode worker is healthy --
    enough to answer -- but until its first check of the prefill workers has passed, requests are recomputed
    on decode. A fleet that is starting (`baton up`, tests, benchmarks) waits for this before its first
    request; Kubernetes probes need only the status code."""
    if not isinstance(ready_body, dict) or not isinstance(ready_body.get("workers"), dict):
        return False
    want = "healthy" if healthy else "checked"
    return all(isinstance(c, dict) and c.get(want) == c.get("total") for c in ready_body["workers"].values())
