"""Where an LLMService's pods send OpenTelemetry traces: `spec.observability.otlpEndpoint`, else the operator's
default (`baton operator run --otlp-traces-endpoint`, Helm value `tracing.otlpEndpoint`), else nowhere.

Render reads the result into the launch contract (`WorkerLaunch` / `RouterLaunch.otlp_traces_endpoint`,
`launch.tracing_env`), so the flag, and vLLM's OTLP protocol variable, are spelled there only. A changed endpoint
changes the pods' command lines and rolls them, as any setting a pod reads does.
"""
from __future__ import annotations

import dataclasses

from baton import launch

from .api import LLMService


@dataclasses.dataclass(frozen=True)
class TracingOptions:
    """The operator's default (set once at start by `baton operator run`)."""

    otlp_endpoint: str | None = None


OPTIONS = TracingOptions()


def configure(otlp_endpoint: str | None) -> None:
    """Replace OPTIONS with the command line's value. ValueError (naming what is wrong) for a bad URL."""
    global OPTIONS
    if otlp_endpoint:
        launch.otlp_traces_url(otlp_endpoint)
    OPTIONS = TracingOptions(otlp_endpoint=otlp_endpoint or None)


def otlp_endpoint(svc: LLMService, opts: TracingOptions | None = None) -> str | None:
    """The OTLP/HTTP endpoint of `svc`'s pods; None: not traced."""
    return svc.spec.observability.otlp_endpoint or (opts or OPTIONS).otlp_endpoint
