"""Dashboards and alert rules: generated files in sync, promtool-valid, alerts firing on synthetic series
(`promtool test rules`), and -- against a real Prometheus scraping a real router + prefill + decode fleet
(`baton up`) under load -- every dashboard query, recording rule and alert signal returning data."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from baton.operator.autoscaler import prefill_capacity

from .conftest import CHART, REPO

PROMTOOL = "promtool"
RULES = CHART / "files" / "prometheus-rules.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"baton_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _promtool() -> str:
    import shutil

    found = shutil.which(PROMTOOL)
    if not found:
        pytest.fail("promtool is missing: apt-get install -y --no-install-recommends prometheus")
    return found


def test_dashboards_match_the_generator():
    pytest.importorskip("grafana_foundation_sdk", reason="pip install grafana-foundation-sdk (dev extra)")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "dashboards.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_rules_match_the_generator():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "prometheus_rules.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_alerts_fire_on_synthetic_series():
    test_file = Path(__file__).parent / "promtool" / "alerts_test.yaml"
    out = subprocess.run([_promtool(), "test", "rules", str(test_file)], capture_output=True, text=True,
                         check=False, cwd=test_file.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboards_are_configmaps_for_the_grafana_sidecar(render):
    docs = render()
    cms = [d for d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert len(cms) == len(list((CHART / "dashboards").glob("*.json"))) == 3
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        model = json.loads(text)
        assert model["uid"] == name.removesuffix(".json") and model["panels"]
    assert not [d for d in render("--set", "grafana.dashboards.enabled=false") if d["kind"] == "ConfigMap"]


def test_prometheusrule_only_with_the_crd_and_with_the_chart_targets(render):
    assert not [d for d in render("--api-versions", "monitoring.coreos.com/v1") if d["kind"] == "PrometheusRule"]
    docs = render("--api-versions", "monitoring.coreos.com/v1/PrometheusRule",
                  "--set", "metrics.prometheusRule.slo.ttftBucket=2.0")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any('baton_router_ttft_seconds_bucket{le="2.0"}' in e for e in exprs)
    assert not any('baton_router_ttft_seconds_bucket{le="0.5"}' in e for e in exprs)
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text().replace(
        'baton_router_ttft_seconds_bucket{le="0.5"}', 'baton_router_ttft_seconds_bucket{le="2.0"}'))["groups"]


# ----------------------------------------------------------------------------------- against real servers

#: Series the operator's autoscaler exports. The autoscaler needs a cluster, an LLMService and Prometheus, so
#: this stand-in serves the autoscaler module's own metric objects (names + labels) with synthetic values.
AUTOSCALER_STUB = textwrap.dedent("""
    import sys, time
    from prometheus_client import start_http_server
    from baton.operator import autoscaler as a
    svc = dict(llmservice=sys.argv[2], namespace=sys.argv[3])
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    a.PROMETHEUS_UP.labels(**svc).set(1)
    while True:
        for role in ("prefill", "decode"):
            a.DESIRED_REPLICAS.labels(**svc, role=role).set(2)
            a.MAX_REPLICAS.labels(**svc, role=role).set(8)
            a.DECISIONS.labels(**svc, role=role, reason="WithinSLO").inc()
        time.sleep(1)
""")


def _start(argv, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait_fleet(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"baton up exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        manifest = run_dir / "fleet.json"
        if manifest.exists():
            fleet = json.loads(manifest.read_text())
            urls = [p["url"] for p in fleet["processes"]]
            try:
                if all(httpx.get(f"{u}/metrics", timeout=2).status_code == 200 for u in urls):
                    router = next(p for p in fleet["processes"] if p["role"] == "router")
                    if httpx.get(f"{router['url']}/v1/models", timeout=2).status_code == 200:
                        return fleet
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"baton up not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _load(endpoint: str, model: str, seconds: float, concurrency: int = 3) -> int:
    """Streaming completions (so the router observes TPOT) from `concurrency` threads for `seconds`."""
    import httpx

    done = [0]
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < stop:
                body = {"model": model, "prompt": f"The baton passes {i} " * (1 + i * 8), "max_tokens": 12,
                        "temperature": 0, "stream": True}
                with client.stream("POST", f"{endpoint}/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        pass
                done[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0]


async def _observe(url: str, name: str, namespace: str):
    from baton.operator.prometheus import PrometheusClient, PrometheusSource

    async with PrometheusClient(url) as client:
        return await PrometheusSource(client, window="1m").observe(name, namespace, ttft_slo=0.5, tpot_slo=0.05)


@pytest.mark.integration
@pytest.mark.slow
def test_every_query_returns_data_from_a_real_fleet(local_prometheus, tmp_path):
    pytest.importorskip("grafana_foundation_sdk", reason="pip install grafana-foundation-sdk (dev extra)")
    from baton.worker.local_fleet import free_port

    dashboards = _tool("dashboards")
    rules = _tool("prometheus_rules")
    renderer = _tool("render_dashboards")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run_dir, up_log = tmp_path / "fleet", tmp_path / "up.log"
    up = _start([sys.executable, "-m", "baton.cli", "up", str(REPO / "examples" / "tiny-local.yaml"),
                 "--run-dir", str(run_dir), "--no-pin"], up_log, env)
    stub_port = free_port()
    stub = _start([sys.executable, "-c", AUTOSCALER_STUB, str(stub_port), "tiny", "default"],
                  tmp_path / "stub.log", env)
    try:
        fleet = _wait_fleet(run_dir, up, up_log)
        targets = [p["url"].removeprefix("http://") for p in fleet["processes"]] + [f"127.0.0.1:{stub_port}"]
        local_prometheus.set_targets(targets)
        local_prometheus.wait_for_targets(timeout=60, scrapes=2)
        router = next(p for p in fleet["processes"] if p["role"] == "router")
        t0 = time.time()
        n = _load(router["url"], "tiny-llama", seconds=40)
        assert n >= 10, f"only {n} requests completed"
        local_prometheus.wait_for_targets(timeout=30, scrapes=3)
        time.sleep(2)

        empty: list[str] = []
        checked = 0
        for path in sorted((CHART / "dashboards").glob("*.json")):
            model = json.loads(path.read_text())
            variables = renderer.default_variables(model)
            for title, expr in dashboards.queries(model):
                q = renderer.substitute(expr, variables, "1m")
                result = local_prometheus.query(q)
                checked += 1
                if not any(s["value"][1] not in ("NaN",) for s in result):
                    empty.append(f"{path.name} / {title}: {q}")
        for rule in rules.recording_rules():
            checked += 1
            if not local_prometheus.query(rule["expr"]):
                empty.append(f"recording {rule['record']}: {rule['expr']}")
        recorded = {r["record"]: r["expr"] for r in rules.recording_rules()}
        for alert in rules.alerts():
            for probe in alert.probes:
                checked += 1
                if not local_prometheus.query(recorded.get(probe, probe)):
                    empty.append(f"alert {alert.name}: {probe}")
        assert not empty, f"{len(empty)}/{checked} queries returned no data:\n" + "\n".join(empty)

        # The autoscaler's own reading of this fleet: one prefill replica's capacity from the workers' busy time
        prefill = asyncio.run(_observe(local_prometheus.url, "tiny", "local")).roles["prefill"]  # baton up: ns local
        assert prefill.prompt_tokens_per_second and prefill.busy_seconds_per_second, prefill
        capacity = prefill_capacity(prefill)  # None: too little busy time for the policy to use
        assert capacity is not None and capacity > prefill.prompt_tokens_per_second, prefill  # 1 replica, not full
        print(f"\nthe autoscaler's view of the fleet under load: prefill {prefill.prompt_tokens_per_second:.0f} "
              f"prompt tok/s, {prefill.busy_fraction:.1%} busy -> capacity {capacity:.0f} prompt tok/s per replica")

        # The PNGs of the dashboards from the same data (kept under $BATON_DASHBOARD_PNG when set).
        out = Path(os.environ.get("BATON_DASHBOARD_PNG") or tmp_path / "png")
        for path in sorted((CHART / "dashboards").glob("*.json")):
            model = json.loads(path.read_text())
            png, counts = renderer.render(model, local_prometheus.url, t0 - 30, time.time(), out,
                                          renderer.default_variables(model), "30s")
            assert png.stat().st_size > 10_000
            assert all(counts.values()), (png, counts)
    finally:
        _stop(stub)
        _stop(up)
