"""Whether a `uri` model source was fetched, from the worker pods' init containers. Pure.

A worker pod with a `uri` source starts with the init container `fetch-model` (`baton model fetch`). When it
fails -- a 404, refused credentials, an untrusted certificate -- it writes one line to its termination message
and the kubelet restarts it with back-off: without this, the LLMService would only say "0/1 pods ready" forever.
The operator reads the pods and turns the first such failure into the condition `ModelReady=False` with the
fetcher's own message, and the phase `Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass

FETCH_CONTAINER = "fetch-model"


@dataclass(frozen=True)
class ModelFetch:
    ok: bool | None  # None: not known yet (no pod has finished fetching)
    reason: str
    message: str


def model_fetch_state(pods: list[dict]) -> ModelFetch:
    """The fetch outcome over the service's worker pods: a failure anywhere wins (it will repeat), else a
    finished fetch anywhere, else unknown."""
    fetched = False
    for pod in pods:
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") != FETCH_CONTAINER:
                continue
            for state in (status.get("state") or {}, status.get("lastState") or {}):
                done = state.get("terminated")
                if not done:
                    continue
                if int(done.get("exitCode") or 0) != 0:
                    message = (done.get("message") or "").strip() or (
                        f"the model download failed (exit code {done.get('exitCode')}, {done.get('reason')})")
                    name = (pod.get("metadata") or {}).get("name", "?")
                    return ModelFetch(False, "ModelFetchFailed", f"pod {name}: {message}")
                fetched = True
    if fetched:
        return ModelFetch(True, "ModelFetched", "the model was downloaded")
    return ModelFetch(None, "Fetching", "no worker pod has finished downloading the model yet")
