"""Operator restarts at any point converge: `baton operator run` SIGKILLed and restarted at random (seeded)
moments against the REAL local control plane, compared with an undisturbed run of the same steps; and the
autoscaler's history (status.autoscaler) carries a running scale-down window across a SIGKILL, with a real
Prometheus scraping an exporter that plays the router.

Seed: BATON_RESTART_SEED (default below); the kill times drawn are printed in the measurements section.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from baton.e2e.fixtures import REPORT_LINES, api_get, get_json, get_llmservice
from baton.e2e.processes import OperatorProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-local.yaml"
SEED = int(os.environ.get("BATON_RESTART_SEED", "13"))
KILLS = 5
#: A kill comes this long (uniform, seeded) after the spec change or after the restarted operator is up (its
#: startup handler done): from before the first read to well after a reconcile's writes (about 1 s).
KILL_AFTER_S = (0.0, 2.5)
#: kopf's log line once the operator's startup handler has run (resuming LLMServices comes next).
UP = "Activity 'configure' succeeded"
#: Kinds whose every object in the namespace is compared (not only ours by label: orphans count too).
KINDS = ("deployments", "replicasets", "services", "serviceaccounts", "roles", "rolebindings", "secrets",
         "configmaps")
#: What the control plane makes by itself in every namespace.
SYSTEM = {"serviceaccounts/default", "configmaps/kube-root-ca.crt"}


class ScopedOperator(OperatorProcess):
    """`baton operator run -n NAMESPACE --no-webhook` (OperatorProcess runs `-A`): two of them run side by side,
    each on its own namespace. No admission webhook: a SIGKILLed operator cannot remove its registration
    (failurePolicy Fail), which would refuse the spec changes made while it is down."""

    def __init__(self, kubeconfig, log_path: Path, namespace: str, *extra: str) -> None:
        super().__init__(str(kubeconfig), log_path, extra_args=extra)
        self.namespace = namespace

    def start(self, kubeconfig_flag: bool = False) -> None:
        self.ups = self.count(UP)
        env = os.environ | {"KUBECONFIG": self.kubeconfig, "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "baton.cli", "operator", "run", "-n", self.namespace, "--no-webhook",
                 "--liveness", "", "--metrics-port", "0", *self.extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def count(self, line: str) -> int:
        return self.log_path.read_text(errors="replace").count(line) if self.log_path.exists() else 0

    def wait_up(self) -> None:
        wait_for("the operator to start", lambda: self.count(UP) > self.ups, timeout=90, diagnostics=self.log_tail)


def _template_hash(template: dict, namespace: str) -> str:
    text = json.dumps(template, sort_keys=True).replace(namespace, "NAMESPACE")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def children(kubectl, ns: str, name: str) -> dict[str, dict]:
    """Every object of `KINDS` in `ns` as comparable facts: owner references (kind, name, controller, and
    whether the uid is the LLMService's), Deployment replicas and pod-template hash, ReplicaSets by pod
    template hash with their replicas."""
    uid = get_json(kubectl, "llmservice", name, "-n", ns)["metadata"]["uid"]
    out: dict[str, dict] = {}
    for kind in KINDS:
        for item in get_json(kubectl, kind, "-n", ns)["items"]:
            meta = item["metadata"]
            key = f"{kind}/{meta['name']}"
            if key in SYSTEM or item.get("type") == "kubernetes.io/service-account-token":
                continue
            owners = sorted((r["kind"], r["name"], bool(r.get("controller")), r["kind"] != "LLMService"
                             or r["uid"] == uid) for r in meta.get("ownerReferences") or [])
            entry: dict = {"owners": owners}
            if kind == "deployments":
                entry["replicas"] = item["spec"]["replicas"]
                entry["template"] = _template_hash(item["spec"]["template"], ns)
            if kind == "replicasets":
                # named <deployment>-<pod-template-hash>, a hash that covers the namespace (in the router's
                # arguments): keyed by the Deployment and the template without the namespace instead
                template = json.loads(json.dumps(item["spec"]["template"]))
                template["metadata"].get("labels", {}).pop("pod-template-hash", None)
                deployment = next((r["name"] for r in meta.get("ownerReferences") or []), "")
                key = f"{kind}/{deployment}/{_template_hash(template, ns)}"
                entry["replicas"] = item["spec"]["replicas"]
            out[key] = entry
    return out


def _diff(got: dict, want: dict) -> str:
    extra = {k: got[k] for k in got.keys() - want.keys()}
    missing = {k: want[k] for k in want.keys() - got.keys()}
    changed = {k: (got[k], want[k]) for k in got.keys() & want.keys() if got[k] != want[k]}
    return f"extra {extra}; missing {missing}; different (got, want) {changed}"


def settled(kubectl, ns: str, name: str) -> dict | None:
    """The LLMService's status once it has caught up with its spec and is Ready, every Deployment has
    finished rolling out (no pods of an earlier template left), AND the LLMService's status has caught up with
    those Deployments (its per-role replicas/readyReplicas are theirs now); else None. Without the last part a
    status written while a rollout's surge pod still ran (prefill 4/4 of 3) was compared: it follows the
    Deployments' events a moment later."""
    obj = get_llmservice(name, ns)  # in-process: the waits poll this
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"] or status.get("phase") != "Ready":
        return None
    for dep in api_get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]:
        st, want = dep.get("status") or {}, dep["spec"]["replicas"]
        if (st.get("observedGeneration", 0) < dep["metadata"]["generation"]
                or not st.get("replicas", 0) == st.get("updatedReplicas", 0) == st.get("readyReplicas", 0) == want):
            return None
        role = dep["metadata"]["name"].removeprefix(f"{name}-")
        mine = status.get(role) or {}
        if (mine.get("replicas", 0), mine.get("readyReplicas", 0)) != (want, want):
            return None
    return status


def status_facts(status: dict) -> dict:
    return {"phase": status["phase"],
            "roles": {r: {k: status[r].get(k) for k in ("replicas", "readyReplicas", "desiredReplicas")}
                      for r in ("prefill", "decode", "router")},
            "conditions": sorted((c["type"], c["status"], c.get("reason")) for c in status["conditions"])}


def steps(name: str) -> list[tuple[str, dict]]:
    """(what, merge patch of the spec) after the create: a scale-up, then a rollout (new pod templates)."""
    return [("scale-up", {"spec": {"prefill": {"replicas": 3}, "decode": {"replicas": 2}}}),
            ("rollout", {"spec": {"engine": {"image": f"localhost/baton/worker:restart-{name}"}}})]


def run_steps(kubectl, ns: str, op: ScopedOperator, rng: random.Random | None = None,
              expect: list[tuple[dict, dict]] | None = None) -> list[tuple[dict, dict]]:
    """Create the example, then each step; with `rng`, SIGKILL and restart the operator KILLS times at random
    moments during each step (not the create). Returns (status facts, children) once each phase has settled
    (with `expect`, filled by an undisturbed run alongside: once they equal those, or as they are after 90 s)."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = ns
    name = body["metadata"]["name"]
    changes = [("create", lambda: kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True))]
    for what, patch in steps(name):
        changes.append((what, lambda p=patch: kubectl("patch", "llmservice", name, "-n", ns, "--type=merge",
                                                      "-p", json.dumps(p), check=True)))
    out = []
    for i, (what, change) in enumerate(changes):
        if i == 0:
            op.wait_up()
        change()
        if rng is not None and i > 0:
            kills = []
            for k in range(KILLS):
                if k:
                    op.wait_up()
                delay = rng.uniform(*KILL_AFTER_S)
                time.sleep(delay)
                op.kill()  # SIGKILL to the process group: no cleanup, mid-whatever it was doing
                op.start()
                kills.append(f"{delay:.2f}")
            REPORT_LINES.append(f"restart convergence: {what}: SIGKILL {', '.join(kills)} s after the change or "
                                f"the restarted operator's start-up (seed {SEED})")

        def facts(i: int = i) -> tuple[dict, dict] | None:
            status = settled(kubectl, ns, name)
            seen = status and (status_facts(status), children(kubectl, ns, name))
            return seen if seen and (expect is None or (i < len(expect) and seen == expect[i])) else None

        try:
            out.append(wait_for(f"{ns}/{name} to settle after {what}", facts, timeout=90, diagnostics=op.log_tail))
        except AssertionError:
            if expect is None:
                raise
            status = settled(kubectl, ns, name) or {"unsettled": get_json(kubectl, "llmservice", name, "-n", ns)}
            out.append((status_facts(status) if "phase" in status else status, children(kubectl, ns, name)))
    return out


def test_sigkilled_operator_converges_to_the_children_of_an_undisturbed_run(
        local_cluster, kubeconfig, kubectl, llmservice_crd, namespace_factory, tmp_path):
    rng = random.Random(SEED)
    started = time.monotonic()
    calm_ns, killed_ns = namespace_factory("calm"), namespace_factory("killed")
    calm_op = ScopedOperator(kubeconfig, tmp_path / "operator-calm.log", calm_ns)
    killed_op = ScopedOperator(kubeconfig, tmp_path / "operator-killed.log", killed_ns)
    calm: list[tuple[dict, dict]] = []
    failures: list[BaseException] = []
    calm_s = 0.0

    def undisturbed() -> None:  # alongside, in its own namespace with its own operator
        nonlocal calm_s
        try:
            calm.extend(run_steps(kubectl, calm_ns, calm_op))
        except BaseException as exc:  # noqa: BLE001  re-raised below
            failures.append(exc)
        calm_s = time.monotonic() - started

    calm_op.start()
    killed_op.start()
    thread = threading.Thread(target=undisturbed)
    thread.start()
    try:
        killed = run_steps(kubectl, killed_ns, killed_op, rng=rng, expect=calm)
        # ...and they stay so: a late reconcile of a restarted operator changes nothing
        time.sleep(2.0)
        still = children(kubectl, killed_ns, "tiny")
    finally:
        thread.join()
        killed_op.stop()
        calm_op.stop()
    if failures:
        raise failures[0]
    REPORT_LINES.append(f"restart convergence: undisturbed run {calm_s:.0f} s; with {2 * KILLS} SIGKILLs "
                        f"{time.monotonic() - started:.0f} s")

    for (what, _), (calm_status, calm_children), (killed_status, killed_children) in zip(
            [("create", {}), *steps("tiny")], calm, killed):
        assert killed_children == calm_children, (f"after {what}: children differ from the undisturbed run: "
                                                  f"{_diff(killed_children, calm_children)}")
        assert killed_status == calm_status, f"after {what}: status differs from the undisturbed run"
    assert still == killed[-1][1]
    final = killed[-1][1]
    assert [k for k in final if k.startswith("secrets/")] == ["secrets/tiny-kv"], final  # exactly one KV Secret
    rollout = {k: v["replicas"] for k, v in final.items() if k.startswith("replicasets/tiny-prefill/")}
    assert sorted(rollout.values()) == [0, 3], rollout  # the first template scaled away, the new one at 3


class _Prefill:
    """Reads the prefill role's autoscaler history from status (policy times: Unix epoch seconds)."""

    def __init__(self, kubectl, ns: str, name: str) -> None:
        self.kubectl, self.ns, self.name = kubectl, ns, name

    def history(self) -> dict:
        status = get_llmservice(self.name, self.ns).get("status") or {}
        return (((status.get("autoscaler") or {}).get("history")) or {}).get("prefill") or {}

    def recommendations(self) -> list[tuple[float, int]]:
        return [(float(t), int(n)) for t, n in self.history().get("recommendations") or []]

    def replicas(self) -> int:
        return api_get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{self.name}-prefill")["spec"]["replicas"]


def test_a_running_scale_down_window_survives_a_sigkill(
        local_cluster, kubeconfig, kubectl, llmservice_crd, namespace, local_prometheus, tmp_path):
    from tests.operator.test_autoscaler_integration import RouterLoad

    window_s, interval_s = 30.0, 2.0
    body = yaml.safe_load(EXAMPLE.read_text())
    name = body["metadata"]["name"]
    body["metadata"]["namespace"] = namespace
    spec = body["spec"]
    spec["slo"] = {"ttft": "500ms", "tpot": "50ms", "attainment": 0.9}
    for role, n in (("prefill", 3), ("decode", 1)):
        spec[role]["replicas"] = n
        spec[role]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4}
        spec[role]["resources"] = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    spec["autoscaling"] = {"enabled": True, "prometheusURL": local_prometheus.url, "interval": f"{interval_s:g}s",
                           "scaleUpStabilization": "0s", "scaleDownStabilization": f"{window_s:g}s"}

    load = RouterLoad(name, namespace)
    load.ttft = 0.4  # p90 ~0.475 s: between 60% of the 500 ms SLO and the SLO, so the policy holds at 3
    local_prometheus.set_targets([load.target])
    op = ScopedOperator(kubeconfig, tmp_path / "operator.log", namespace, "--autoscaler-window", "10s")
    prefill = _Prefill(kubectl, namespace, name)
    try:
        local_prometheus.wait_for_targets(scrapes=1)
        op.start()
        kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=True)
        wait_for("the autoscaler to record holds at 3 prefill replicas",
                 lambda: sum(n == 3 for _, n in prefill.recommendations()) >= 3, timeout=60, diagnostics=op.log_tail)

        load.ttft = 0.08  # well under 60% of the SLO: the policy now wants fewer prefill replicas
        first_low = wait_for("the autoscaler to see the low TTFT", lambda: min(
            (t for t, n in prefill.recommendations() if n < 3), default=None), timeout=40, diagnostics=op.log_tail)
        # Kill while the scale-down window runs: it ends window_s after the last recommendation to hold at 3.
        time.sleep(8.0)
        before = prefill.recommendations()
        last_hold = max(t for t, n in before if n >= 3)
        assert prefill.replicas() == 3 and time.time() < last_hold + window_s - 10, (before, time.time())
        op.kill()
        restarted = time.time()
        op.start()

        wait_for("the prefill scale-down", lambda: prefill.replicas() < 3, timeout=window_s + 30,
                 diagnostics=op.log_tail)
        scaled = prefill.history()
        down_at = float(scaled["lastScaleTime"])
        # the restarted operator evaluated while the window still ran (so it had the chance to end it early)
        held_after = [t for t, n in prefill.recommendations() if restarted < t < last_hold + window_s and n < 3]
        assert held_after, (restarted, last_hold, prefill.recommendations())
        REPORT_LINES.append(f"autoscaler restart: last hold at +{last_hold - first_low:.1f} s, SIGKILL at "
                            f"+{restarted - first_low:.1f} s, scale-down at +{down_at - first_low:.1f} s "
                            f"(window {window_s:g} s; a window started over would end after "
                            f"+{restarted + window_s - first_low:.1f} s)")
        assert scaled["lastScaleReason"] == "BelowSLOScaleDown", scaled
        # Not premature: the holds recorded before the kill kept the replicas for the whole window...
        assert down_at - last_hold > window_s, (last_hold, down_at)
        # ...and the window was not started over by the restart (it would end window_s after it).
        assert down_at < restarted + window_s, (restarted, down_at)
        assert prefill.replicas() == 2  # one step (max one pod down per evaluation)
        assert "autoscaler history restored from status.autoscaler" in op.log_tail(400)
    finally:
        op.stop()
        load.close()
