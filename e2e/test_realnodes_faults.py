"""Prefill pods leaving, on real nodes, under a steady load through the router's ClusterIP.

1. A scale-down (3 -> 1) is a drain: the leaving pods drop out of the routers' rotation at once (/ready 503),
   keep serving the KV caches they handed out until every lease is pulled, and only then exit. Proof, with counts:
   no failed request, no prefill failure at the router (no hop to a leaving pod failed, nothing recomputed), no KV
   pull failed at the decode worker, and no lease of a leaving pod expired (its own metrics, scraped until it is
   gone).
2. Prefill pods crash (SIGKILL of the worker, not a drain): first one, then all of them. What follows is the
   router's prefill-failure policy (`spec.router.prefillFailure`: retry another prefill worker, recompute on
   decode while it has headroom, else 503 + Retry-After); every request either succeeds or gets that 503, none
   hangs past the router's hop timeout, and the router's per-outcome counters account for it.

Same fixtures as test_realnodes.py (e2e/conftest.py: one real-node cluster per run; the images are built from this tree).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from baton.e2e.fixtures import REPORT_LINES
from baton.e2e.processes import wait_for
from baton.e2e.test_realnodes import (
    MODEL_NAME,
    PROMPTS,
    Load,
    _fleet_manifest,
    _get,
    _k,
    _pods,
    _ready,
    cluster_ip,
    router_sees,
)

from baton import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

NS = "faults"
NAME = "drain"
#: the router's --hop-timeout default: no request may take longer than this plus its own work
HOP_TIMEOUT_SECONDS = 60.0


def _log(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


def _metrics(ip: str, port: int = launch.DEFAULT_METRICS_PORT) -> dict[str, float]:
    """`name{labels}` -> value of one pod's /metrics; {} when it does not answer (gone)."""
    status, body = _get(f"http://{ip}:{port}/metrics", timeout=2)
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, value in metrics.items():
        if key.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def _service_pods(c, role: str) -> list[dict]:
    return [p for p in _pods(c, f"app.kubernetes.io/instance={NAME},baton.dev/role={role}", NS)]


def _live(c, role: str) -> list[dict]:
    return [p for p in _service_pods(c, role) if not p["metadata"].get("deletionTimestamp")]


def _router_ip(c) -> str:
    (router,) = [p for p in _live(c, "router") if _ready(p)]
    return router["status"]["podIP"]


class RouterCounters:
    """The router's outcome counters (it outlives every worker pod, so its counts are complete)."""

    OUTCOMES = ("ok", "fallback_recompute", "error", "cancelled", "overloaded", "rejected")

    def __init__(self, ip: str) -> None:
        self.ip = ip

    def read(self) -> dict[str, float]:
        m = _metrics(self.ip, launch.DEFAULT_METRICS_PORT)
        assert m, "the router's /metrics does not answer"
        out = {f"requests/{o}": _sum(m, "baton_router_requests_total", outcome=o) for o in self.OUTCOMES}
        for o in launch.PREFILL_FAILURE_OUTCOMES:
            out[f"prefill_failures/{o}"] = _sum(m, launch.Metric.ROUTER_PREFILL_FAILURES, outcome=o)
        out["hop_errors/prefill"] = _sum(m, "baton_router_hop_errors_total", role="prefill")
        out["hop_errors/decode"] = _sum(m, "baton_router_hop_errors_total", role="decode")
        return out

    @staticmethod
    def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
        return {k: int(after[k] - before.get(k, 0)) for k in after}


def _decode_kv_failures(c) -> float:
    return sum(_sum(_metrics(p["status"]["podIP"]), "baton_kv_transfer_failures_total") for p in _live(c, "decode"))


class LeaseWatch:
    """Scrapes the lease metrics of some pods every `interval` s, from the host, until they stop answering; keeps
    the first and last scrape of each (a pod's counters die with it, so the last one before it goes is the count)."""

    def __init__(self, pods: dict[str, str], interval: float = 0.25) -> None:
        self.pods = pods  # name -> pod IP
        self.first: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict[str, float]] = {}
        self.max_held: dict[str, float] = dict.fromkeys(pods, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _scrape(self, name: str, ip: str) -> None:
        m = _metrics(ip)
        if not m:
            return
        s = {"held": _sum(m, launch.Metric.KV_LEASES),
             launch.LEASE_PULLED: _sum(m, launch.Metric.KV_LEASES_ENDED + "_total", outcome=launch.LEASE_PULLED),
             launch.LEASE_EXPIRED: _sum(m, launch.Metric.KV_LEASES_ENDED + "_total", outcome=launch.LEASE_EXPIRED)}
        self.first.setdefault(name, s)
        self.last[name] = s
        self.max_held[name] = max(self.max_held[name], s["held"])

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, ip in self.pods.items():
                self._scrape(name, ip)
            self._stop.wait(0.25)

    def __enter__(self) -> Self:
        for name, ip in self.pods.items():
            self._scrape(name, ip)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def fleet(real_cluster, release, tiny_model):
    """LLMService `drain` in namespace `faults`: 3 prefill pods (real-0), 1 decode (real-1), 1 router."""
    import yaml

    c = real_cluster
    _k(c, "create", "namespace", NS, check=False)
    body = _fleet_manifest(c.worker_ref, tiny_model)
    body["metadata"].update(name=NAME, namespace=NS)
    body["spec"]["prefill"]["replicas"] = 3
    # three prefill pods share real-0 with the operator: request less CPU than the example does
    body["spec"]["prefill"]["resources"] = {"requests": {"cpu": "200m", "memory": "384Mi"},
                                            "limits": {"cpu": "1", "memory": "1Gi"}}
    _k(c, "apply", "-f", "-", input=yaml.safe_dump(body))
    try:
        wait_for("LLMService drain Ready with 3 prefill pods, all seen by its router",
                 lambda: len([p for p in _live(c, "prefill") if _ready(p)])
                 == 3 and _live(c, "router") and _ready(_live(c, "router")[0]) and _live(c, "decode")
                 and _ready(_live(c, "decode")[0]) and router_sees(c, NAME, NS, prefill=3), timeout=360, interval=2)
    except AssertionError:
        print(_k(c, "get", "pods,events", "-n", NS, "-o", "wide", check=False).stdout, file=sys.stderr)
        raise
    yield c
    _k(c, "delete", "llmservice", NAME, "-n", NS, "--wait=false", check=False)


def test_prefill_pods_render_their_drain_budget(fleet):
    """The operator pod (built from this tree) renders the grace period from the worker's own drain budget."""
    (pod, *_) = _live(fleet, "prefill")
    spec = pod["spec"]
    args = spec["containers"][0]["args"]
    drain = float(args[len(args) - 1 - args[::-1].index(launch.Flag.DRAIN_TIMEOUT) + 1])
    assert drain == launch.drain_timeout_seconds("prefill")
    assert spec["terminationGracePeriodSeconds"] == launch.termination_grace_seconds(
        launch.WorkerLaunch(engine="baton", role="prefill", model_path="/m", served_model_name=MODEL_NAME))


def test_scale_down_drains_prefill_pods_without_losing_a_kv_cache(fleet, tiny_model):
    c = fleet
    router = RouterCounters(_router_ip(c))
    leaving_all = {p["metadata"]["name"]: p["status"]["podIP"] for p in _live(c, "prefill")}
    base = f"http://{cluster_ip(c, NAME, NS)}:80/v1"
    with Load(base, threads=3, model_dir=tiny_model) as load:
        wait_for("the load to get going", lambda: load.counts()[0] >= 15, timeout=120)
        time.sleep(2)
        before, kv_failures0 = router.read(), _decode_kv_failures(c)
        ok0, failed0 = load.counts()
        with LeaseWatch(leaving_all) as watch:
            t0 = time.monotonic()
            _k(c, "patch", "llmservice", NAME, "-n", NS, "--type=merge", "-p",
               json.dumps({"spec": {"prefill": {"replicas": 1}}}))

            def settled():
                every = _service_pods(c, "prefill")
                return len(every) == 1 and _ready(every[0]) and every

            (kept,) = wait_for("prefill scaled to 1, the others gone", settled, timeout=240, interval=0.5)
            drained_in = time.monotonic() - t0
            time.sleep(3)  # traffic on the settled fleet too
        # the clients' count first, then the router's: the router counts a request before its client has it, so
        # read in this order the router's delta can only be larger (cold run 7 read the decode pods' KV failures
        # in between, and the router was 16 requests short of the clients at ~20 requests a second)
        ok1, failed1 = load.counts()
        after = router.read()
        kv_failures1 = _decode_kv_failures(c)
    leaving = [n for n in leaving_all if n != kept["metadata"]["name"]]
    delta = RouterCounters.delta(after, before)
    pulled = {n: int(watch.last[n][launch.LEASE_PULLED] - watch.first[n][launch.LEASE_PULLED]) for n in leaving}
    expired = {n: int(watch.last[n][launch.LEASE_EXPIRED]) for n in leaving}
    lines = [
        f"prefill 3 -> 1 under load: {ok1 - ok0} ok, {failed1 - failed0} failed, settled in {drained_in:.1f}s",
        f"  router during the scale-down: {delta}",
        f"  decode KV pull failures: {int(kv_failures1 - kv_failures0)}",
        *(f"  leaving pod {n}: {pulled[n]} KV leases pulled while watched, {expired[n]} expired, "
          f"{int(watch.last[n]['held'])} held at its last scrape (max {int(watch.max_held[n])})" for n in leaving),
    ]
    summary = "\n".join(lines)
    print(summary, file=sys.stderr)
    REPORT_LINES.extend(lines)
    assert failed1 == failed0 == 0, summary + "\n" + "\n".join(load.failed[:10])
    assert ok1 - ok0 > 10, summary
    assert all(n in watch.last for n in leaving), summary  # every leaving pod was scraped
    assert sum(expired.values()) == 0, summary
    assert int(kv_failures1 - kv_failures0) == 0, summary
    assert sum(delta[f"prefill_failures/{o}"] for o in launch.PREFILL_FAILURE_OUTCOMES) == 0, summary
    assert delta["requests/fallback_recompute"] == 0 and delta["hop_errors/prefill"] == 0, summary
    assert delta["requests/ok"] >= ok1 - ok0 - 3, summary  # the router saw the same requests succeed


# ------------------------------------------------------------------------------------------------ crashes


def _worker_pids(pod_uid: str) -> list[int]:
    """Host pids of the worker process of a pod (same host: its containers are processes here), found through
    the pod's cgroup (kubelet's cgroupfs driver names it pod<uid>) and the command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroup = (proc / "cgroup").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"pod{pod_uid}" in cgroup and b"worker" in cmdline and b"--role" in cmdline:
            pids.append(int(proc.name))
    return pids


def _sigkill(pod: dict) -> int:
    pids = _worker_pids(pod["metadata"]["uid"])
    assert pids, f"no worker process found for pod {pod['metadata']['name']}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


class TimedLoad(Load):
    """`Load` that also times every request and counts 503 + Retry-After answers (the policy's rejection)
    apart from failures."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rejected = 0
        self.longest = 0.0

    def _run(self, i: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=150)
        n, t0 = 0, 0.0
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            self.paced(t0)
            n += 1
            prompt = f"{PROMPTS[n % len(PROMPTS)]} {i} {n}"
            t0 = time.monotonic()
            try:
                self.complete(client, prompt, stream=False)
                outcome = "ok"
            except openai.APIStatusError as exc:
                if exc.status_code == 503 and exc.response.headers.get("Retry-After"):
                    outcome = "rejected"
                else:
                    outcome = f"{type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                outcome = f"{type(exc).__name__}: {exc}"[:300]
            took = time.monotonic() - t0
            with self._lock:
                self.longest = max(self.longest, took)
                if outcome == "ok":
                    self.ok += 1
                elif outcome == "rejected":
                    self.rejected += 1
                    time.sleep(0.2)
                else:
                    self.failed.append(outcome)


def test_prefill_crashes_follow_the_prefill_failure_policy(fleet, tiny_model):
    """SIGKILL one prefill worker, then every one: requests are retried on another prefill worker, recomputed on
    decode or answered 503 + Retry-After, as `spec.router.prefillFailure` says; none fails otherwise or hangs."""
    c = fleet
    _k(c, "patch", "llmservice", NAME, "-n", NS, "--type=merge", "-p",
       json.dumps({"spec": {"prefill": {"replicas": 2}}}))
    wait_for("2 Ready prefill pods", lambda: len([p for p in _live(c, "prefill") if _ready(p)]) == 2, timeout=240,
             interval=1)
    router = RouterCounters(_router_ip(c))
    base = f"http://{cluster_ip(c, NAME, NS)}:80/v1"
    lines: list[str] = []
    with TimedLoad(base, threads=3, model_dir=tiny_model) as load:
        wait_for("the load to get going", lambda: load.ok >= 10, timeout=120)
        time.sleep(2)

        def phase(name: str, victims: list[dict]) -> None:
            before = router.read()
            ok0, rej0, failed0 = load.ok, load.rejected, len(load.failed)
            killed = sum(_sigkill(p) for p in victims)
            restarts0 = {p["metadata"]["name"]: _restarts(p) for p in victims}
            wait_for(f"{name}: the killed workers restarted and Ready again", lambda: all(
                _restarts(p) > restarts0[p["metadata"]["name"]] and _ready(p)
                for p in _live(c, "prefill") if p["metadata"]["name"] in restarts0), timeout=240, interval=1)
            time.sleep(3)
            d = RouterCounters.delta(router.read(), before)
            lines.append(f"{name} ({killed} processes SIGKILLed): {load.ok - ok0} ok, {load.rejected - rej0} "
                         f"503+Retry-After, {len(load.failed) - failed0} failed; router prefill failures: "
                         + ", ".join(f"{o} {d[f'prefill_failures/{o}']}" for o in launch.PREFILL_FAILURE_OUTCOMES)
                         + f"; outcomes ok {d['requests/ok']}, fallback_recompute {d['requests/fallback_recompute']},"
                         f" rejected {d['requests/rejected']}")
            # the router accounts for what the clients saw
            assert d["requests/rejected"] == load.rejected - rej0, lines[-1]
            assert d["prefill_failures/rejected"] == load.rejected - rej0, lines[-1]

        phase("one prefill pod killed", [_live(c, "prefill")[0]])
        phase("every prefill pod killed", _live(c, "prefill"))
    lines.append(f"longest request: {load.longest:.1f}s (router hop timeout {HOP_TIMEOUT_SECONDS:.0f}s)")
    summary = "\n".join(lines)
    print(summary, file=sys.stderr)
    REPORT_LINES.extend(f"prefill crashes under load: {x}" for x in lines)
    assert not load.failed, summary + "\n" + "\n".join(load.failed[:10])
    assert load.longest < HOP_TIMEOUT_SECONDS, summary
    assert re.search(r"every prefill pod killed .*: [1-9]\d* ok", summary), summary


def _restarts(pod: dict) -> int:
    return sum(cs.get("restartCount", 0) for cs in pod.get("status", {}).get("containerStatuses", []))


def test_a_prefill_outage_is_a_prefill_failure_not_a_silent_recompute(fleet, tiny_model):
    """With `prefillFailure.recompute: never`, a prefill tier whose every pod crashed must answer 503 +
    Retry-After, not have the decode worker recompute prompts: the policy applies for the whole outage, also once
    the crashed pods have left the Endpoints' ready addresses (only KV caches lost with a pod -- the decode pull
    failed, the KV existed -- are recomputed)."""
    c = fleet
    _k(c, "patch", "llmservice", NAME, "-n", NS, "--type=merge", "-p",
       json.dumps({"spec": {"router": {"prefillFailure": {"recompute": launch.RECOMPUTE_NEVER}}}}))

    def new_router():
        every = _service_pods(c, "router")
        args = every[0]["spec"]["containers"][0]["args"] if len(every) == 1 else []
        return len(every) == 1 and _ready(every[0]) and launch.RECOMPUTE_NEVER in args and every[0]

    router_pod = wait_for("the router rolled onto recompute: never", new_router, timeout=240, interval=1)
    router = RouterCounters(router_pod["status"]["podIP"])
    wait_for("2 Ready prefill pods", lambda: len([p for p in _live(c, "prefill") if _ready(p)]) == 2, timeout=240,
             interval=1)
    base = f"http://{cluster_ip(c, NAME, NS)}:80/v1"
    with TimedLoad(base, threads=3, model_dir=tiny_model) as load:
        wait_for("the load to get going", lambda: load.ok >= 10, timeout=120)
        before, kv0 = router.read(), _decode_kv_failures(c)
        victims = _live(c, "prefill")
        restarts0 = {p["metadata"]["name"]: _restarts(p) for p in victims}
        killed = sum(_sigkill(p) for p in victims)
        wait_for("the killed workers restarted and Ready again", lambda: all(
            _restarts(p) > restarts0[p["metadata"]["name"]] and _ready(p)
            for p in _live(c, "prefill") if p["metadata"]["name"] in restarts0), timeout=240, interval=1)
        time.sleep(3)
        d, kv_lost = RouterCounters.delta(router.read(), before), int(_decode_kv_failures(c) - kv0)
    failures = ", ".join(f"{o} {d['prefill_failures/' + o]}" for o in launch.PREFILL_FAILURE_OUTCOMES)
    line = (f"prefill outage with recompute: never ({killed} processes SIGKILLed): {load.ok} ok, {load.rejected} "
            f"503+Retry-After, {len(load.failed)} failed; router: rejected {d['requests/rejected']}, "
            f"fallback_recompute {d['requests/fallback_recompute']} (KV lost with a pod: {kv_lost}), "
            f"prefill failures {failures}; longest request {load.longest:.1f}s")
    print(line, file=sys.stderr)
    REPORT_LINES.append(line)
    assert not load.failed, line + "\n" + "\n".join(load.failed[:10])
    assert load.longest < HOP_TIMEOUT_SECONDS, line
    assert load.rejected > 0 and d["prefill_failures/rejected"] == load.rejected, line
    assert d["prefill_failures/recomputed"] == 0, line
    assert d["requests/fallback_recompute"] <= kv_lost, line  # no prompt recomputed because prefill was down
