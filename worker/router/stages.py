"""A request's TTFT split into stages (`baton_router_ttft_stage_seconds{stage}`): where the time to first token
went, so a slow TTFT points at a tier (prefill queue = too few prefill workers, prefill compute = long prompts or
slow GPUs, KV handoff = the link, first decode = decode queue or the router).

The router cannot see inside the workers, so each worker reports its own part in a `Server-Timing` response
header (`baton.launch.Timing`): `queue` and `prefill` when it computed the prompt, `queue` and `kv_import` when it
pulled the KV from a prefill worker. The router adds what only it knows -- when it sent each hop -- and puts the
rest, whatever nobody reported, in `first_decode`, so the stages of one request add up to its TTFT exactly:

    prefill_queue   = (hop sent - arrival) + worker queue   of the hop whose prefill produced the first token
    prefill_compute = that worker's `prefill`
    kv_handoff      = the decode worker's `kv_import`        (only when the KV came from a prefill worker)
    first_decode    = TTFT - the three above                 (HTTP, decode queue, first chunk, router)

The prefill that produced the first token is the prefill hop's when the KV was handed over, else the decode
worker's own (a recompute); time lost on failed prefill attempts before it counts as prefill_queue. Each stage is
capped at what is left of the TTFT (a worker cannot report more time than the router saw pass).

Workers that report nothing (vLLM): their stages are not observed; `first_decode` is observed (it then also holds
the unreported stages, which is why it is the residual).
"""

from __future__ import annotations

import dataclasses

from baton.launch import TTFT_STAGES, Timing

PREFILL_QUEUE, PREFILL_COMPUTE, KV_HANDOFF, FIRST_DECODE = TTFT_STAGES


@dataclasses.dataclass(frozen=True)
class Hop:
    """A hop that answered: when the router sent it (seconds after the request's arrival) and what its worker
    reported in Server-Timing ({name: seconds})."""

    sent: float
    timings: dict[str, float]


def ttft_stages(ttft: float, prefill: Hop | None, decode: Hop | None) -> dict[str, float]:
    """{stage: seconds} of one request (see the module docstring); the values add up to `ttft`."""
    source = decode if decode is not None and Timing.PREFILL in decode.timings else prefill
    reported: list[tuple[str, float]] = []
    if source is not None and Timing.QUEUE in source.timings:
        reported.append((PREFILL_QUEUE, source.sent + source.timings[Timing.QUEUE]))
    if source is not None and Timing.PREFILL in source.timings:
        reported.append((PREFILL_COMPUTE, source.timings[Timing.PREFILL]))
    if source is prefill and decode is not None and Timing.KV_IMPORT in decode.timings:
        reported.append((KV_HANDOFF, decode.timings[Timing.KV_IMPORT]))
    left = max(0.0, ttft)
    stages: dict[str, float] = {}
    for stage, seconds in reported:
        stages[stage] = min(max(0.0, seconds), left)
        left -= stages[stage]
    stages[FIRST_DECODE] = left
    return stages
