"""Which decode workers may take which prefill worker's KV: pairing by KV-layout fingerprint. Pure, no I/O.

Every Baton worker reports a fingerprint of its KV layout (`worker/engine/fingerprint.py`: engine and version,
model identity, dtype, KV block size, TP layout, cache shape) in its /ready body; the health checks keep it on
the endpoint (`Endpoint.fingerprint`). A KV cache is handed only between equal fingerprints. A worker whose
fingerprint is unknown (None: vLLM's /health has no body) is trusted to match any -- a fleet of one engine and
one model is the case vLLM's own KV connector checks for itself.

During a rollout that changes the layout (a new model revision, dtype or block size), old and new workers run
side by side; the router then keeps old prefill with old decode and new with new:

1. the prefill hop goes to a prefill worker that has a healthy decode partner (`with_partner`); when none has,
   the prompt is recomputed on a decode worker (no prefill hop; `baton_router_layout_mismatch_total`);
2. the decode hop that carries the KV goes to a partner of the prefill worker that produced it
   (`partners`); if none is left (it went away meanwhile), the decode worker recomputes the prompt instead
   (the original request without kv_transfer_params), counted the same way.

Each decode hop sent with KV is counted by how the fingerprints compared (`match`:
`baton_router_kv_handoffs_total{match="same"|"unknown"|"cross"}`); `cross` stays 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from baton.launch import KV_HANDOFF_MATCHES

SAME, UNKNOWN, CROSS = KV_HANDOFF_MATCHES


class Fingerprinted(Protocol):
    fingerprint: str | None


E = TypeVar("E", bound=Fingerprinted)


def compatible(a: str | None, b: str | None) -> bool:
    """Whether KV computed under fingerprint `a` may be used under `b`: equal, or either unknown."""
    return a is None or b is None or a == b


def match(prefill: str | None, decode: str | None) -> str:
    """How a handoff from `prefill` to `decode` compares: SAME, UNKNOWN (either side reports none) or CROSS."""
    if prefill is None or decode is None:
        return UNKNOWN
    return SAME if prefill == decode else CROSS


def partners(prefill: str | None, decodes: Sequence[E]) -> list[E]:
    """The decode workers that may take KV computed under fingerprint `prefill`."""
    return [d for d in decodes if compatible(prefill, d.fingerprint)]


def for_kv(prefill: str | None, decodes: Sequence[E]) -> tuple[list[E], bool]:
    """(decode candidates, recompute) for a decode hop carrying KV computed under `prefill`: its partners and
    False, or -- none of `decodes` may take it -- all of them and True (recompute the prompt instead)."""
    paired = partners(prefill, decodes)
    return (paired, False) if paired else (list(decodes), True)


def with_partner(prefills: Sequence[E], decodes: Sequence[Fingerprinted]) -> list[E]:
    """The prefill workers whose KV some decode worker in `decodes` may take (empty when none can)."""
    fingerprints = {d.fingerprint for d in decodes}
    if None in fingerprints:  # an unknown decode worker pairs with every prefill worker
        return list(prefills) if decodes else []
    return [p for p in prefills if p.fingerprint is None or p.fingerprint in fingerprints]
