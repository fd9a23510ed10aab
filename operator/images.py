"""Which images the operator's pods run, and the pull secrets they get: the operator's configuration, not a
name in the code.

The router and the model-fetch init container always run Baton's worker image (they are `baton router` and
`baton model fetch`); Baton-engine workers run it too unless `spec.engine.image` names another. That image is
the operator's `--worker-image` (env `BATON_WORKER_IMAGE`; the Helm chart sets it from its `workerImage`
values, next to the operator's own image), overridden per LLMService by `spec.router.image` -- and, for a
Baton-engine service that names `spec.engine.image`, by that image (`router_image`). Pull secrets are
the operator's `--image-pull-secret` (env `BATON_IMAGE_PULL_SECRETS`, comma-separated; chart value
`workerImage.pullSecrets`) plus `spec.imagePullSecrets`, on every pod the operator renders; they name Secrets in
the LLMService's namespace.

Without any configuration (a local `baton operator run`), the worker image is `baton/worker:<this Baton's
version>`: what `docker build -f docker/worker.Dockerfile -t baton/worker:VERSION .` produces.
"""
from __future__ import annotations

import dataclasses
import os
from importlib import metadata

ENV_WORKER_IMAGE = "BATON_WORKER_IMAGE"
ENV_PULL_SECRETS = "BATON_IMAGE_PULL_SECRETS"
WORKER_REPOSITORY = "baton/worker"


def local_worker_image() -> str:
    """The worker image of an unconfigured operator: the local build's name, tagged with Baton's version."""
    try:
        version = metadata.version("baton")
    except metadata.PackageNotFoundError:  # a source tree without installed metadata
        version = "latest"
    return f"{WORKER_REPOSITORY}:{version}"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.strip() for s in (value or "").split(",") if s.strip()))


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """The operator's image settings (set once at start by `baton operator run`)."""

    worker_image: str = dataclasses.field(
        default_factory=lambda: os.environ.get(ENV_WORKER_IMAGE) or local_worker_image())
    pull_secrets: tuple[str, ...] = dataclasses.field(
        default_factory=lambda: _split(os.environ.get(ENV_PULL_SECRETS)))


#: Set by `baton operator run` (flags, else environment); `render` reads it when given no options.
OPTIONS = ImageOptions()


def configure(worker_image: str | None = None, pull_secrets: list[str] | tuple[str, ...] | None = None) -> None:
    """Replace OPTIONS with the command line's values; what is not given keeps the environment's."""
    global OPTIONS
    base = ImageOptions()
    OPTIONS = ImageOptions(
        worker_image=worker_image or base.worker_image,
        pull_secrets=tuple(dict.fromkeys(s for s in pull_secrets if s)) if pull_secrets else base.pull_secrets)


def router_image(spec, options: ImageOptions) -> str:
    """The router's and the fetch container's image: spec.router.image; else, for a Baton-engine service that
    names its workers' image, that image (a Baton worker image: it has `baton router` and `baton model fetch`,
    and it is the one the service is known to pull); else the operator's worker image."""
    if spec.router.image:
        return spec.router.image
    if spec.engine.kind == "baton" and spec.engine.image:
        return spec.engine.image
    return options.worker_image


def engine_image(spec, options: ImageOptions) -> str | None:
    """The workers' image: spec.engine.image; for the Baton engine the operator's worker image when unset;
    None for a vLLM service without one (refused: Baton ships no vLLM image)."""
    if spec.engine.image:
        return spec.engine.image
    return options.worker_image if spec.engine.kind == "baton" else None


def pull_secrets(spec, options: ImageOptions) -> list[dict[str, str]]:
    """imagePullSecrets of every pod: the LLMService's, then the operator's, each once."""
    names = dict.fromkeys([s.name for s in spec.image_pull_secrets] + list(options.pull_secrets))
    return [{"name": n} for n in names]
