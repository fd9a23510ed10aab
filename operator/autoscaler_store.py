"""Where the autoscaler keeps its memory across operator restarts: `status.autoscaler` of the LLMService.

Pure functions (no I/O); `autoscaler.tick` does the reads and writes. Two fields:

- `history`: the policy's `History` exactly as `History.to_dict()` writes it (stabilization windows,
  warm-up, last scale times). The operator's policy clock is the wall clock (`time.time()`, Unix epoch
  seconds), not a monotonic one, because a monotonic clock's zero is per process (per boot): only epoch
  times mean the same thing to the next operator process, on this node or another. A clock that is behind
  the one that wrote the history makes the windows longer (a later scale-down, never an earlier one).
- `pending`: the scale actions of one tick, `{role: {from, to, reason, at}}`, written together with the
  history that records them and *before* the Deployments are scaled (write-ahead), cleared after. An
  operator killed in between finds them on start and completes those still in order (see `unfinished`),
  so a recorded decision is never lost, and a decision that is not recorded is never acted on.

Why status and not an annotation: this is observed state the operator alone writes, which is what status is
for (`kubectl get -o yaml` shows it; users' `kubectl apply` of the spec never touches or conflicts with it,
and writing it bumps no `metadata.generation`); the status subresource also keeps it out of reach of anyone
who may only edit the spec. The CRD declares both fields `x-kubernetes-preserve-unknown-fields`, so new
`History` fields survive the apiserver's pruning without a schema change.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from baton.operator.autoscale_policy import ROLES, History, RoleDecision


def replacing(new: Mapping[str, Any], live: Any) -> dict[str, Any]:
    """A merge patch that makes `live` equal to `new`: keys `live` has and `new` lacks are nulled (a merge
    patch merges objects key by key, so a field some other operator version wrote would otherwise stay)."""
    live = live if isinstance(live, Mapping) else {}
    out: dict[str, Any] = {}
    for key, value in new.items():
        out[key] = replacing(value, live.get(key)) if isinstance(value, Mapping) else value
    for key in live:
        if key not in new:
            out[key] = None
    return out


def status_patch(history: History, live: Any, pending: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`status.autoscaler` as a merge patch: the history, and the pending actions (None clears them)."""
    live = live if isinstance(live, Mapping) else {}
    return {"history": replacing(history.to_dict(), live.get("history")),
            "pending": dict(pending) if pending else None}


def pending_actions(decisions: Mapping[str, RoleDecision], now_s: float) -> dict[str, dict[str, Any]]:
    """The write-ahead record of the scale actions about to be applied."""
    return {role: {"from": d.current, "to": d.desired, "reason": d.reason, "at": now_s}
            for role, d in decisions.items() if d.changed}


def restore(saved: Any) -> tuple[History, dict[str, Any]]:
    """(history, pending) from `status.autoscaler`; an unreadable history (hand-edited, say) gives an empty
    one, and thereby the policy's fresh start: a whole scale-down window watched before any scale-down."""
    saved = saved if isinstance(saved, Mapping) else {}
    try:
        history = History.from_dict(saved.get("history"))
    except (TypeError, ValueError, AttributeError, KeyError):
        history = History()
    pending = saved.get("pending")
    return history, dict(pending) if isinstance(pending, Mapping) else {}


def unfinished(pending: Mapping[str, Any], replicas: Mapping[str, int | None], now_s: float,
               max_age_s: float) -> dict[str, tuple[int, int, str]]:
    """The recorded actions to complete after a restart: role -> (from, to, reason).

    Only those whose Deployment still has the `from` replicas (already at `to`: done; anything else: someone
    else has scaled it since, and the next evaluation starts from there), and that are younger than
    `max_age_s` (the metrics window they were decided on: an older decision is stale, the next evaluation
    decides afresh).
    """
    out: dict[str, tuple[int, int, str]] = {}
    for role in ROLES:
        action = pending.get(role)
        if not isinstance(action, Mapping):
            continue
        try:
            start, target, at = int(action["from"]), int(action["to"]), float(action["at"])
        except (KeyError, TypeError, ValueError):
            continue
        if replicas.get(role) == start and start != target and abs(now_s - at) <= max_age_s:
            out[role] = (start, target, str(action.get("reason") or ""))
    return out
