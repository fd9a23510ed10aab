"""Reconcile latency and operator memory on a REAL kube-apiserver (the local control plane).

Creates N LLMServices (default 50) and measures, for each, the time from the create call returning to all
of its children existing (every object `render` makes for it: ServiceAccount, Role, RoleBinding, Services, Deployments, NetworkPolicies), in two modes:
- sequential: one LLMService at a time (latency of an idle operator);
- burst: all N created back to back (latency under a queue of work).
Prints p50/p99 per mode, the number of objects involved, and the operator's RSS (current and peak).

    python benchmarks/reconcile.py [--count 50] [--no-webhook]
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from baton.e2e.build import kubectl_path
from baton.e2e.cluster import LocalCluster, free_port
from baton.operator.kube import Kube
from baton.operator.reconcile import CHILD_KINDS
from baton.operator.render import render

from baton.workload import percentile  # the one percentile definition

REPO = Path(__file__).resolve().parents[1]



def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def children_per_service(kube: Kube, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for api_version, kind in CHILD_KINDS:
        for obj in kube.list(api_version, kind, namespace, "app.kubernetes.io/managed-by=baton-operator"):
            owner = obj["metadata"]["labels"].get("app.kubernetes.io/instance", "")
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def run_mode(kube: Kube, template: dict, namespace: str, count: int, burst: bool, expected: int) -> list[float]:
    created: dict[str, float] = {}
    done: dict[str, float] = {}

    def create(i: int) -> None:
        body = copy.deepcopy(template)
        name = f"bench-{'b' if burst else 's'}-{i:03d}"
        body["metadata"] = {"name": name, "namespace": namespace}
        kube.create(body)
        created[name] = time.monotonic()

    def poll_until(names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while names - done.keys():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {len(names - done.keys())} LLMServices never got all children")
            counts = children_per_service(kube, namespace)
            now = time.monotonic()
            for name in names - done.keys():
                if counts.get(name, 0) >= expected:
                    done[name] = now
            time.sleep(0.02)

    if burst:
        for i in range(count):
            create(i)
        poll_until(set(created), timeout=300)
    else:
        for i in range(count):
            create(i)
            poll_until({f"bench-s-{i:03d}"}, timeout=60)
            print(f"\r  sequential: {i + 1}/{count}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return [done[n] - created[n] for n in created]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--no-webhook", action="store_true", help="run the operator without its admission webhook")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    template = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
    expected = len(render({**template, "metadata": {"name": "x", "namespace": "x", "uid": "u", "generation": 1}}))
    with LocalCluster(log=lambda m: print(f"[cluster] {m}", file=sys.stderr)) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        kube = Kube(cluster.api_client())
        kubectl = [kubectl_path() or "kubectl", f"--kubeconfig={cluster.kubeconfig}"]
        subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds" / "llmservice.yaml")], check=True,
                       capture_output=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/llmservices.baton.dev"], check=True,
                       capture_output=True)
        env = os.environ | {"KUBECONFIG": str(cluster.kubeconfig)}
        log = open(Path(tmp) / "operator.log", "wb")  # noqa: SIM115 (outlives this block: the child writes it)
        argv = [sys.executable, "-m", "baton.cli", "operator", "run", "-A", "--liveness", "", "--metrics-port", "0",
                "--webhook-listen", "127.0.0.1", "--webhook-port", str(free_port())]
        if args.no_webhook:
            argv.append("--no-webhook")
        operator = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(3.0)  # let the operator list/watch and register its webhook
            results = {}
            for mode, burst in (("sequential", False), ("burst", True)):
                ns = f"bench-{mode}"
                subprocess.run([*kubectl, "create", "namespace", ns], check=True, capture_output=True)
                cluster.wait_for_service_account(ns)
                results[mode] = run_mode(kube, template, ns, args.count, burst, expected)
            rss, peak = rss_kib(operator.pid)
        finally:
            os.killpg(operator.pid, signal.SIGINT)
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(operator.pid, signal.SIGKILL)

    objects = args.count * expected
    print(f"\nreconcile benchmark: {args.count} LLMServices per mode, {expected} children each "
          f"({objects} objects per mode, {2 * objects} in all), webhook {'off' if args.no_webhook else 'on'}")
    print(f"{'mode':<12}{'p50 (s)':>10}{'p99 (s)':>10}{'max (s)':>10}{'mean (s)':>10}")
    for mode, values in results.items():
        print(f"{mode:<12}{statistics.median(values):>10.3f}{percentile(values, 99):>10.3f}"
              f"{max(values):>10.3f}{statistics.fmean(values):>10.3f}")
    print(f"operator RSS after {2 * args.count} LLMServices / {2 * objects} children: {rss / 1024:.1f} MiB "
          f"(peak {peak / 1024:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
