"""Render of `uri` model sources with the model cache (operator/model_cache.py): the node cache (hostPath, the
default), a PVC cache, and the opt-out (`mode: none`, an emptyDir per pod)."""
from __future__ import annotations

import copy

import pytest
from baton.operator import model_cache
from baton.operator.api import InvalidLLMService
from baton.operator.render import render

from baton import launch
from baton.cli import build_parser

URI = "https://models.example/llama/"


def service(cache: dict | None = None, engine: str = "baton", **source) -> dict:
    model = {"name": "m", "source": {"uri": URI, **source}}
    if cache is not None:
        model["cache"] = cache
    spec = {"model": model, "engine": {"kind": engine, **({"image": "vllm/vllm-openai:v1"} if engine == "vllm"
                                                            else {})}}
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "svc", "namespace": "ns", "uid": "uid-1", "generation": 1}, "spec": spec}


def pod(manifests: list[dict], role: str) -> dict:
    (d,) = [m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == f"svc-{role}"]
    return d["spec"]["template"]["spec"]


def worker(p: dict) -> dict:
    (c,) = p["containers"]
    return c


@pytest.mark.parametrize("engine", ["baton", "vllm"])
def test_the_node_cache_is_the_default(engine):
    key = launch.model_cache_key(URI)
    for role in ("prefill", "decode"):
        p = pod(render(service(engine=engine, secretRef={"name": "creds"})), role)
        assert p["volumes"][0] == {"name": "model", "hostPath": {"path": model_cache.DEFAULT_HOST_PATH,
                                                                 "type": "DirectoryOrCreate"}}
        (init,) = p["initContainers"]
        assert init["command"] == ["baton", "model", "fetch"]
        assert init["args"] == ["--uri", URI, "--cache-dir", launch.MODEL_CACHE_MOUNT]
        assert init["volumeMounts"] == [{"name": "model", "mountPath": launch.MODEL_CACHE_MOUNT}]  # read-write
        assert init["resources"] == {"requests": {"ephemeral-storage": "1Gi"}}
        assert init["envFrom"] == [{"secretRef": {"name": "creds"}}]
        # root, to write the root-owned hostPath folder -- and nothing else
        assert init["securityContext"] == {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
                                           "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        c = worker(p)
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": key}
        model_arg = c["args"][c["args"].index("--model") + 1] if engine == "baton" else c["args"][0]
        assert model_arg == "/models"  # the entry, through the subPath mount
        if engine == "baton":
            assert p["securityContext"]["runAsUser"] == 1000  # the worker stays non-root


def test_the_worker_mounts_the_entry_the_fetch_writes(tmp_path, monkeypatch):
    """The subPath render gives the worker is the folder `baton model fetch --cache-dir` fills: both come from
    the same argv and key (the fetch's argv parsed by the real CLI parser)."""
    (init,) = pod(render(service()), "decode")["initContainers"]
    args = build_parser().parse_args([*init["command"][1:], *init["args"]])
    assert args.cache_dir == launch.MODEL_CACHE_MOUNT and args.dest is None
    from baton.worker import model_cache as fetch_side

    seen = {}

    def fake_fetch(uri, dest, **_):
        seen["dest"] = dest
        (dest / "config.json").parent.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        return "fetched"

    monkeypatch.setattr(fetch_side, "fetch_model", fake_fetch)
    entry, _ = fetch_side.fetch_cached(args.uri, tmp_path, say=lambda _: None)
    assert entry.name == worker(pod(render(service()), "decode"))["volumeMounts"][0]["subPath"]


def test_size_sets_the_ephemeral_storage_request_and_the_host_path_is_the_operators(monkeypatch):
    monkeypatch.setattr(model_cache, "OPTIONS", model_cache.Options(host_path="/data/baton-cache"))
    p = pod(render(service({"size": "20Gi"})), "decode")
    assert p["initContainers"][0]["resources"] == {"requests": {"ephemeral-storage": "20Gi"}}
    assert p["volumes"][0]["hostPath"]["path"] == "/data/baton-cache"
    with pytest.raises(ValueError, match="absolute"):
        model_cache.configure("relative/path")


def test_a_pvc_cache():
    p = pod(render(service({"pvc": "model-cache"})), "prefill")
    assert p["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "model-cache"}}
    (init,) = p["initContainers"]
    assert init["args"][-2:] == ["--cache-dir", launch.MODEL_CACHE_MOUNT]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": launch.MODEL_CACHE_MOUNT}]
    assert "resources" not in init  # the claim's storage, not the node's
    assert worker(p)["volumeMounts"][0] == {"name": "model", "mountPath": "/models", "readOnly": True,
                                            "subPath": launch.model_cache_key(URI)}


def test_the_opt_out_is_an_empty_dir_per_pod():
    p = pod(render(service({"mode": "none"})), "decode")
    assert p["volumes"][0] == {"name": "model", "emptyDir": {}}
    (init,) = p["initContainers"]
    assert init["args"] == ["--uri", URI, "--dest", "/models"]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    assert "resources" not in init and "runAsUser" not in init["securityContext"]
    assert worker(p)["volumeMounts"][0] == {"name": "model", "mountPath": "/models", "readOnly": True}


def test_other_sources_are_untouched_and_bad_caches_are_refused():
    body = service()
    body["spec"]["model"]["source"] = {"pvc": {"claimName": "models"}}
    p = pod(render(body), "decode")
    assert "initContainers" not in p and "subPath" not in worker(p)["volumeMounts"][0]
    with pytest.raises(InvalidLLMService, match="spec.model.cache.pvc"):
        render(service({"mode": "none", "pvc": "x"}))
    with pytest.raises(InvalidLLMService, match="spec.model.cache.mode"):
        render(service({"mode": "everywhere"}))


def test_a_new_uri_rolls_the_workers_onto_a_new_entry():
    a, b = render(service()), render(copy.deepcopy(service()))
    assert pod(a, "decode") == pod(b, "decode")
    other = service()
    other["spec"]["model"]["source"]["uri"] = "https://models.example/llama-v2/"
    assert worker(pod(render(other), "decode"))["volumeMounts"][0]["subPath"] != \
        worker(pod(a, "decode"))["volumeMounts"][0]["subPath"]
