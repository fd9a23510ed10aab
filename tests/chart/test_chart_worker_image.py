"""Images of the pods the operator renders come from the chart (its `workerImage` values, handed to the
operator as --worker-image / --image-pull-secret) or from the LLMService, never from a name in Baton's code."""
from __future__ import annotations

import copy

import yaml
from baton.operator import images
from baton.operator.admission import review
from baton.operator.render import render
from baton.operator.run_cli import add_operator_command

from .conftest import REPO

EXAMPLE = REPO / "examples" / "llama-disagg.yaml"  # vLLM, uri source (model-fetch init container)


def _operator_options(docs: list[dict]) -> images.ImageOptions:
    """The ImageOptions the chart's operator Deployment starts with: its args, parsed by `baton operator run`."""
    import argparse

    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    add_operator_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(c["args"])
    saved = images.OPTIONS
    try:
        images.configure(args.worker_image, args.image_pull_secret)
        return images.OPTIONS
    finally:
        images.OPTIONS = saved


def _pods(manifests: list[dict]) -> list[dict]:
    return [m["spec"]["template"]["spec"] for m in manifests if m["kind"] == "Deployment"]


def _images(pod: dict) -> list[str]:
    return [c["image"] for c in [*pod.get("initContainers", []), *pod["containers"]]]


def test_default_values_configure_every_image_of_a_vllm_service(render, monkeypatch):
    monkeypatch.delenv(images.ENV_WORKER_IMAGE, raising=False)
    # an operator the chart did not configure would show up as this name
    monkeypatch.setattr(images, "local_worker_image", lambda: "unconfigured/worker:none")
    docs = render()
    opts = _operator_options(docs)
    values = yaml.safe_load((REPO / "charts" / "baton" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO / "charts" / "baton" / "Chart.yaml").read_text())
    assert opts.worker_image == f"{values['workerImage']['repository']}:{chart['appVersion']}"
    svc = yaml.safe_load(EXAMPLE.read_text())
    manifests = render_with(svc, opts)
    pods = _pods(manifests)
    assert len(pods) == 3 and any(p.get("initContainers") for p in pods)
    seen = {image for p in pods for image in _images(p)}
    # the vLLM workers run the LLMService's vLLM image; the router and the model-fetch init containers the
    # chart's worker image -- nothing else
    assert seen == {opts.worker_image, svc["spec"]["engine"]["image"]}
    for p in pods:
        assert "imagePullSecrets" not in p  # none configured


def test_worker_image_and_pull_secrets_values_reach_every_pod(render):
    digest = "sha256:" + "b" * 64
    docs = render("--set", f"workerImage.registry=registry.example,workerImage.digest={digest}",
                  "--set", "workerImage.pullSecrets={regcred,other}")
    opts = _operator_options(docs)
    assert opts.worker_image == f"registry.example/baton/worker@{digest}"
    assert opts.pull_secrets == ("regcred", "other")
    svc = yaml.safe_load(EXAMPLE.read_text())
    svc["spec"]["imagePullSecrets"] = [{"name": "team"}, {"name": "regcred"}]
    for p in _pods(render_with(svc, opts)):
        assert p["imagePullSecrets"] == [{"name": "team"}, {"name": "regcred"}, {"name": "other"}]
        assert set(_images(p)) <= {opts.worker_image, svc["spec"]["engine"]["image"]}


def test_spec_router_image_overrides_the_operators():
    svc = yaml.safe_load(EXAMPLE.read_text())
    svc["spec"]["router"]["image"] = "mirror.example/baton/worker:pinned"
    opts = images.ImageOptions(worker_image="chart/worker:1", pull_secrets=())
    pods = {m["metadata"]["name"]: m["spec"]["template"]["spec"] for m in render_with(svc, opts)
            if m["kind"] == "Deployment"}
    assert _images(pods["llama-8b-router"]) == ["mirror.example/baton/worker:pinned"]
    assert pods["llama-8b-prefill"]["initContainers"][0]["image"] == "mirror.example/baton/worker:pinned"
    baton = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
    worker_images = {i for p in _pods(render_with(baton, opts)) for i in _images(p)}
    assert worker_images == {"chart/worker:1"}  # the Baton engine: workers and router alike


def test_a_vllm_service_must_name_its_image():
    svc = yaml.safe_load(EXAMPLE.read_text())
    del svc["spec"]["engine"]["image"]
    assert any(p.startswith("spec.engine.image: is required with engine.kind vllm") for p in review(svc, None))


def render_with(svc: dict, opts: images.ImageOptions) -> list[dict]:
    body = copy.deepcopy(svc)
    body["metadata"].setdefault("namespace", "ns")
    return render(body, opts)


def test_unconfigured_operator_uses_the_local_build_name(monkeypatch):
    monkeypatch.delenv(images.ENV_WORKER_IMAGE, raising=False)
    assert images.ImageOptions().worker_image == images.local_worker_image()
    monkeypatch.setenv(images.ENV_WORKER_IMAGE, "env/worker:2")
    monkeypatch.setenv(images.ENV_PULL_SECRETS, "a, b,a")
    assert images.ImageOptions() == images.ImageOptions(worker_image="env/worker:2", pull_secrets=("a", "b"))

