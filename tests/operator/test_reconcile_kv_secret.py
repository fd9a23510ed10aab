"""`reconcile` and the KV Secret, on an in-memory API (no cluster): a Secret someone else planted under the
KV Secret's fixed name is never handed to workers, and the operator still never reads a Secret.

The fake answers what reconcile calls (get/list/create/apply/delete/status patch) the way the apiserver does
for these kinds, and refuses every read of a Secret (403), as the chart's RBAC does.
"""
from __future__ import annotations

import copy
import itertools
import json

import pytest
from baton.operator.kube import KubeError
from baton.operator.naming import kv_secret_name
from baton.operator.reconcile import reconcile

NS, NAME = "team", "svc"
WORKERS = {f"Deployment/{NAME}-prefill", f"Deployment/{NAME}-decode"}


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 (what `patch_llmservice_status` sends)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            target[key] = merge_patch(target.get(key) if isinstance(target.get(key), dict) else {}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKube:
    def __init__(self, llmservice: dict) -> None:
        self.llms = copy.deepcopy(llmservice)
        self.objects: dict[tuple[str, str], dict] = {}  # (kind, name) -> object
        self.secrets: dict[str, dict] = {}
        self.uids = (f"uid-{i}" for i in itertools.count(1))
        self.versions = itertools.count(1)
        self.calls: list[tuple[str, str, str]] = []
        self.create_error: KubeError | None = None

    # -- someone else, with rights the operator lacks
    def plant_secret(self, name: str, token: str = "known-to-someone-else") -> None:
        self.secrets[name] = {"metadata": {"name": name, "namespace": NS, "uid": next(self.uids)},
                              "stringData": {"token": token}}

    # -- the calls reconcile makes
    def get(self, api_version, kind, namespace, name):
        self.calls.append(("get", kind, name))
        if kind == "Secret":
            raise KubeError(403, "secrets is forbidden: cannot get resource \"secrets\"")
        if kind == "LLMService":
            return copy.deepcopy(self.llms) if name == NAME else None
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj else None

    def list(self, api_version, kind, namespace, label_selector=""):
        self.calls.append(("list", kind, label_selector))
        if kind == "Secret":
            raise KubeError(403, "secrets is forbidden: cannot list resource \"secrets\"")
        want = dict(kv.split("=", 1) for kv in label_selector.split(",") if kv)
        return [copy.deepcopy(o) for (k, _), o in self.objects.items()
                if k == kind and all(o["metadata"].get("labels", {}).get(a) == b for a, b in want.items())]

    def create(self, manifest):
        self.calls.append(("create", manifest["kind"], manifest["metadata"]["name"]))
        assert manifest["kind"] == "Secret"
        if self.create_error is not None:
            raise self.create_error
        name = manifest["metadata"]["name"]
        if name in self.secrets:
            raise KubeError(409, f"secrets \"{name}\" already exists")
        obj = copy.deepcopy(manifest)
        obj["metadata"]["uid"] = next(self.uids)
        self.secrets[name] = obj
        return copy.deepcopy(obj)

    def apply(self, manifest, *, field_manager="baton-operator", force=True):
        self.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        key = (manifest["kind"], manifest["metadata"]["name"])
        obj = copy.deepcopy(self.objects.get(key) or {})
        merge_patch(obj, copy.deepcopy(manifest))
        obj["metadata"].setdefault("uid", next(self.uids))
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def delete(self, api_version, kind, namespace, name):
        self.calls.append(("delete", kind, name))
        return self.objects.pop((kind, name), None) is not None

    def patch_llmservice_status(self, namespace, name, status):
        self.calls.append(("status", "LLMService", json.dumps(status, sort_keys=True)))
        merge_patch(self.llms.setdefault("status", {}), copy.deepcopy(status))
        return copy.deepcopy(self.llms)

    # -- what the tests look at
    def deployments(self) -> set[str]:
        return {f"Deployment/{n}" for k, n in self.objects if k == "Deployment"}

    def secret_ref(self, role: str) -> str:
        env = self.objects[("Deployment", f"{NAME}-{role}")]["spec"]["template"]["spec"]["containers"][0]["env"]
        return next(e for e in env if e["name"] == "BATON_KV_SECRET")["valueFrom"]["secretKeyRef"]["name"]


def llmservice(**annotations) -> dict:
    return {
        "apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NS, "uid": "llms-uid", "generation": 1,
                     **({"annotations": annotations} if annotations else {})},
        "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "models"}}}, "engine": {"kind": "baton"}},
    }


def run(kube: FakeKube):
    events: list[tuple[str, str, str]] = []
    result = reconcile(kube, NS, NAME, lambda *e: events.append(e))
    return result, events


def condition(kube: FakeKube, type_: str) -> dict:
    return next((c for c in kube.llms["status"].get("conditions", []) if c["type"] == type_), {})


def never_read_a_secret(kube: FakeKube) -> None:
    assert not [c for c in kube.calls if c[1] == "Secret" and c[0] != "create"], kube.calls


# -------------------------------------------------------------------------------------------- the tests
def test_own_secret_is_recorded_and_its_409_is_ours():
    kube = FakeKube(llmservice())
    result, events = run(kube)
    assert f"Secret/{NAME}-kv" in result.created and result.error is None
    uid = kube.secrets[f"{NAME}-kv"]["metadata"]["uid"]
    assert kube.llms["status"]["kvSecrets"] == {f"{NAME}-kv": uid}
    assert WORKERS <= kube.deployments()
    # the record is written right after the create, before any child is applied
    order = [c[0] for c in kube.calls]
    assert order.index("create") + 1 == order.index("status") < order.index("apply")

    result, events = run(kube)  # the create now answers 409: ours, by the record
    assert result.error is None and not result.created
    assert not [e for e in events if e[0] == "Warning"]
    assert condition(kube, "KVSecretReady") == {}  # no conflict was ever seen: no condition at all
    assert kube.llms["status"]["phase"] != "Failed"
    never_read_a_secret(kube)


def test_planted_secret_before_the_first_reconcile_starts_no_worker():
    kube = FakeKube(llmservice())
    kube.plant_secret(f"{NAME}-kv")
    _, events = run(kube)

    assert not (WORKERS & kube.deployments()), "a worker was started with someone else's Secret"
    assert f"Deployment/{NAME}-router" in kube.deployments()  # the rest of the service is there
    assert kube.llms["status"]["phase"] == "Failed"
    cond = condition(kube, "KVSecretReady")
    assert cond["status"] == "False" and cond["reason"] == "KVSecretConflict"
    assert f"Secret {NS}/{NAME}-kv" in cond["message"] and "not made by this operator" in cond["message"]
    ready = condition(kube, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "KVSecretConflict"
    warnings = [e for e in events if e[0] == "Warning" and e[1] == "KVSecretConflict"]
    assert len(warnings) == 1 and f"{NAME}-kv" in warnings[0][2]
    assert "known-to-someone-else" not in json.dumps(events) + json.dumps(kube.llms["status"])

    # Still a conflict on the next reconciles (status now has observedGeneration: no late adoption), and
    # the Warning Event is not repeated every resync.
    for _ in range(2):
        _, events = run(kube)
        assert not (WORKERS & kube.deployments())
        assert condition(kube, "KVSecretReady")["status"] == "False"
        assert not [e for e in events if e[1] == "KVSecretConflict"]

    # Deleting the planted Secret lets the operator make its own; the condition turns True.
    del kube.secrets[f"{NAME}-kv"]
    run(kube)
    assert WORKERS <= kube.deployments()
    assert kube.secrets[f"{NAME}-kv"]["stringData"]["token"] != "known-to-someone-else"
    assert f"{NAME}-kv" in kube.llms["status"]["kvSecrets"]
    cond = condition(kube, "KVSecretReady")
    assert cond["status"] == "True" and cond["reason"] == "KVSecretOwned"
    assert condition(kube, "Ready")["reason"] != "KVSecretConflict"
    never_read_a_secret(kube)


def test_planted_rotation_target_leaves_running_workers_on_their_secret():
    kube = FakeKube(llmservice())
    run(kube)
    before = {k: copy.deepcopy(v) for k, v in kube.objects.items() if k[0] == "Deployment"}
    assert kube.secret_ref("prefill") == f"{NAME}-kv"

    rotated = kv_secret_name(NAME, "r1")
    kube.plant_secret(rotated)
    kube.llms["metadata"]["annotations"] = {"baton.dev/rotate-kv-secret": "r1"}
    calls = len(kube.calls)
    _, events = run(kube)

    applied = {c[2] for c in kube.calls[calls:] if c[0] in ("apply", "delete") and c[1] == "Deployment"}
    assert not applied & {f"{NAME}-prefill", f"{NAME}-decode"}, "the workers were rolled onto a planted Secret"
    for role in ("prefill", "decode"):  # held as they were: neither changed nor pruned
        assert kube.objects[("Deployment", f"{NAME}-{role}")] == before[("Deployment", f"{NAME}-{role}")]
        assert kube.secret_ref(role) == f"{NAME}-kv"
    assert condition(kube, "KVSecretReady")["reason"] == "KVSecretConflict"
    assert rotated in condition(kube, "KVSecretReady")["message"]
    assert kube.llms["status"]["prefill"]["replicas"] is not None  # status still reads the held Deployments
    assert [e[1] for e in events if e[0] == "Warning"] == ["KVSecretConflict", "PhaseFailed"]


def test_secret_of_an_operator_without_the_record_is_adopted_once():
    body = llmservice()
    body["status"] = {"observedGeneration": 1, "phase": "Ready"}  # reconciled by an older operator
    kube = FakeKube(body)
    kube.plant_secret(f"{NAME}-kv")  # made by that operator (it kept no record)
    result, events = run(kube)
    assert WORKERS <= kube.deployments() and result.error is None
    assert kube.llms["status"]["kvSecrets"] == {f"{NAME}-kv": ""}
    assert condition(kube, "KVSecretReady") == {}
    assert not [e for e in events if e[1] == "KVSecretConflict"]


def test_failed_create_leaves_no_window_for_adoption():
    """A create that fails otherwise (e.g. a Secret quota) must not let a later planted Secret pass as an older
    operator's: the status the operator writes carries the (empty) record."""
    kube = FakeKube(llmservice())
    kube.create_error = KubeError(403, "exceeded quota: secrets")
    result, _ = run(kube)
    assert result.error and kube.llms["status"]["phase"] == "Failed"
    assert kube.llms["status"].get("kvSecrets") == {}
    kube.create_error = None
    kube.plant_secret(f"{NAME}-kv")
    run(kube)
    assert not (WORKERS & kube.deployments())
    assert condition(kube, "KVSecretReady")["reason"] == "KVSecretConflict"


@pytest.mark.parametrize("status", [500, 0])
def test_other_create_failures_are_apply_errors(status):
    kube = FakeKube(llmservice())
    kube.create_error = KubeError(status, "boom")
    result, events = run(kube)
    assert "boom" in result.error and ("Warning", "ApplyFailed") in {(e[0], e[1]) for e in events}
    assert not (WORKERS & kube.deployments())
