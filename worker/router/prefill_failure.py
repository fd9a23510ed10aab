"""What the router does when a request's prefill hop fails: the policy of `spec.router.prefillFailure`.

A failed prefill hop (connection error, 5xx, a hop or stream-idle timeout, a 200 without kv_transfer_params),
or no healthy prefill worker left in a fleet that has some, goes through three steps:

1. retry on ANOTHER prefill worker, each at most once, up to `retries` of them (a single bad pod -- crashed,
   OOM-killed, being replaced -- must not cost the decode tier a whole prompt);
2. recompute: the decode worker runs the prompt itself, if `recompute` allows it. `always` (what the router did
   before the policy existed), `never`, or `whenHeadroom`: only while the decode tier has TPOT headroom;
3. otherwise fail fast: 503 with `Retry-After: retry_after` (the client's retry finds a recovered prefill tier
   instead of making every running stream slower).

Headroom, measurably: the p90 of the TPOTs the router itself observed over the last `window` seconds is at most
`HEADROOM_FRACTION` of the TPOT SLO (`--tpot-slo`, the LLMService's `spec.slo.tpot`). A recomputed prompt is a
prefill on a decode worker, which stalls that worker's running streams for its length; 20 % of the SLO is the
margin it may eat. With fewer than `MIN_SAMPLES` TPOTs in the window, or no SLO given, there is no evidence of
pressure and the answer is yes (a quiet fleet recomputes, as before). The answer is damped (`HeadroomGate`):
once headroom is gone, recomputing resumes only when the p90 is back under `REOPEN_FRACTION` of the SLO, so a
p90 hovering at the threshold does not switch recompute on and off with every request (each recompute pushes
the TPOT it is judged by up; a 20-point band holds the decision still).

Why `whenHeadroom` is the default: with `always`, a prefill-tier outage moves every prompt onto the decode
workers and breaks the TPOT SLO of every stream at once (the failure DistServe separates the tiers to avoid);
with `never`, a single failed hop costs the client an error although decode was idle. `whenHeadroom` behaves as
`always` while decode is comfortable (the common case, and what users had before) and sheds load only when
recomputing would break the decode SLO.

Pure decisions here (`decide`, `has_headroom`); `TPOTWindow` and `HeadroomGate` are the small state they read.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from baton.launch import RECOMPUTE_ALWAYS, RECOMPUTE_MODES, RECOMPUTE_NEVER, RECOMPUTE_WHEN_HEADROOM
from baton.workload import percentile

DEFAULT_RETRIES = 1
DEFAULT_RECOMPUTE = RECOMPUTE_WHEN_HEADROOM
DEFAULT_RETRY_AFTER = 5  # seconds
#: recent TPOT p90 <= this share of the TPOT SLO: decode has headroom for a recomputed prompt
HEADROOM_FRACTION = 0.8
#: after headroom was lost, recent TPOT p90 <= this share of the SLO before recomputing resumes (hysteresis)
REOPEN_FRACTION = 0.6
#: seconds of TPOT observations the headroom looks at
HEADROOM_WINDOW = 30.0
#: fewer TPOTs than this in the window: no evidence of pressure (headroom)
MIN_SAMPLES = 10
#: TPOTs kept at most (a busy router observes thousands a second; the p90 of the newest is enough)
MAX_SAMPLES = 4096

RETRY = "retry"
RECOMPUTE = "recompute"
REJECT = "reject"


@dataclasses.dataclass(frozen=True)
class PrefillFailurePolicy:
    retries: int = DEFAULT_RETRIES
    recompute: str = DEFAULT_RECOMPUTE
    retry_after: int = DEFAULT_RETRY_AFTER  # seconds, the 503's Retry-After
    tpot_slo: float | None = None  # seconds; None: whenHeadroom has no SLO to protect (always headroom)

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, not {self.recompute!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be at least 1 second, not {self.retry_after}")
        if self.tpot_slo is not None and self.tpot_slo <= 0:
            raise ValueError(f"tpot_slo must be positive, not {self.tpot_slo}")


def decide(policy: PrefillFailurePolicy, failed: int, other_prefill: bool, headroom: bool) -> str:
    """After `failed` failed prefill hops of one request: RETRY (on another prefill worker, `other_prefill`
    says one is healthy and untried), RECOMPUTE (on the decode worker) or REJECT (503 + Retry-After)."""
    if other_prefill and failed <= policy.retries:
        return RETRY
    if policy.recompute == RECOMPUTE_ALWAYS or (policy.recompute == RECOMPUTE_WHEN_HEADROOM and headroom):
        return RECOMPUTE
    return REJECT


def has_headroom(recent_tpots: list[float], tpot_slo: float | None, *, fraction: float = HEADROOM_FRACTION,
                 min_samples: int = MIN_SAMPLES) -> bool:
    """Whether decode can take a recomputed prompt: p90 of `recent_tpots` <= `fraction` x `tpot_slo`; True
    without an SLO or with fewer than `min_samples` TPOTs (no evidence of pressure)."""
    if tpot_slo is None or len(recent_tpots) < min_samples:
        return True
    return percentile(recent_tpots, 90) <= fraction * tpot_slo


class HeadroomGate:
    """`has_headroom` with hysteresis: open (recompute allowed) until the p90 passes `HEADROOM_FRACTION` of the
    SLO, then closed until it is back under `REOPEN_FRACTION`. Without evidence (no SLO, too few TPOTs) it is
    open, as `has_headroom` is."""

    def __init__(self, close_at: float = HEADROOM_FRACTION, reopen_at: float = REOPEN_FRACTION) -> None:
        if not 0 < reopen_at <= close_at:
            raise ValueError(f"reopen_at ({reopen_at}) must be in (0, close_at={close_at}]")
        self.close_at = close_at
        self.reopen_at = reopen_at
        self.open = True

    def check(self, recent_tpots: list[float], tpot_slo: float | None) -> bool:
        fraction = self.close_at if self.open else self.reopen_at
        self.open = has_headroom(recent_tpots, tpot_slo, fraction=fraction)
        return self.open


class TPOTWindow:
    """The TPOTs the router observed over the last `window` seconds (at most MAX_SAMPLES, newest kept)."""

    def __init__(self, window: float = HEADROOM_WINDOW, clock=time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_SAMPLES)

    def observe(self, tpot: float) -> None:
        self._samples.append((self.clock(), tpot))

    def values(self) -> list[float]:
        cutoff = self.clock() - self.window
        samples = self._samples
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        return [v for _, v in samples]


__all__ = [
    "RECOMPUTE", "RECOMPUTE_ALWAYS", "RECOMPUTE_NEVER", "REJECT", "RETRY", "HeadroomGate", "PrefillFailurePolicy",
    "TPOTWindow", "decide", "has_headroom",
]
