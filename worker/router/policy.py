"""Worker selection policies: pure, synchronous, no I/O (unit-tested without servers).

A policy picks one endpoint among `candidates` (healthy endpoints of one role). Each candidate has
`.url` and `.inflight` (requests this router has in flight there), and may have `.load` (the larger of
`inflight` and the worker's own running + waiting queue from its metrics; see pool.py), which the load-aware
policies use when present. `key` is the routing key of the request
(the start of its prompt) and only matters to prefix-aware.

- least-loaded: lowest load (in-flight requests); ties broken at random.
- round-robin: each call takes the next endpoint (in URL order, so membership changes do not reshuffle).
- prefix-aware: consistent hashing of the key onto a ring of virtual nodes, with bounded loads
  (Mirrokni et al., "Consistent Hashing with Bounded Loads"): an endpoint is skipped while its in-flight
  count would exceed `load_factor` x the average; requests sharing a prompt prefix land on the same worker
  (its prefix cache stays warm) until that worker gets hot. Without a key it behaves as least-loaded.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol

POLICIES = ("least-loaded", "prefix-aware", "round-robin")

#: Characters of the prompt hashed by prefix-aware (about 64 tokens of English text).
DEFAULT_PREFIX_CHARS = 256


class Candidate(Protocol):
    url: str
    inflight: int


def load_of(c: Candidate) -> int:
    """The load a policy compares: `.load` where the candidate has one, else `.inflight`."""
    load = getattr(c, "load", None)
    return c.inflight if load is None else load


class Policy:
    name = ""

    def choose(self, candidates: Sequence[Candidate], key: str | None = None) -> Candidate:
        raise NotImplementedError


class LeastLoaded(Policy):
    name = "least-loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate], key: str | None = None) -> Candidate:
        if not candidates:
            raise LookupError("no candidates")
        if len(candidates) == 1:
            return candidates[0]
        loads = [load_of(c) for c in candidates]
        low = min(loads)
        best = [c for c, load in zip(candidates, loads, strict=True) if load == low]
        return best[0] if len(best) == 1 else self.rng.choice(best)


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self.counter = 0

    def choose(self, candidates: Sequence[Candidate], key: str | None = None) -> Candidate:
        if not candidates:
            raise LookupError("no candidates")
        ordered = sorted(candidates, key=lambda c: c.url)
        pick = ordered[self.counter % len(ordered)]
        self.counter += 1
        return pick


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class PrefixAware(Policy):
    name = "prefix-aware"

    def __init__(
        self,
        prefix_chars: int = DEFAULT_PREFIX_CHARS,
        load_factor: float = 1.25,
        vnodes: int = 64,
        rng: random.Random | None = None,
    ) -> None:
        if prefix_chars < 1 or load_factor < 1.0 or vnodes < 1:
            raise ValueError("prefix_chars >= 1, load_factor >= 1 and vnodes >= 1 are required")
        self.prefix_chars = prefix_chars
        self.load_factor = load_factor
        self.vnodes = vnodes
        self.fallback = LeastLoaded(rng)
        self._ring_for: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, urls: tuple[str, ...]) -> None:
        if urls == self._ring_for:
            return
        pairs = sorted((_hash(f"{u}#{i}"), u) for u in urls for i in range(self.vnodes))
        self._points = [p for p, _ in pairs]
        self._owners = [u for _, u in pairs]
        self._ring_for = urls

    def key_of(self, text: str) -> str:
        return text[: self.prefix_chars]

    def choose(self, candidates: Sequence[Candidate], key: str | None = None) -> Candidate:
        if not candidates:
            raise LookupError("no candidates")
        if key is None or len(candidates) == 1:
            return self.fallback.choose(candidates)
        by_url = {c.url: c for c in candidates}
        self._ring(tuple(sorted(by_url)))
        total = sum(load_of(c) for c in candidates) + 1  # counting this request
        cap = math.ceil(self.load_factor * total / len(candidates))
        start = bisect.bisect_left(self._points, _hash(self.key_of(key))) % len(self._points)
        seen: set[str] = set()
        n = len(self._points)
        for step in range(n):
            url = self._owners[(start + step) % n]
            if url in seen:
                continue
            seen.add(url)
            if load_of(by_url[url]) + 1 <= cap:
                return by_url[url]
            if len(seen) == len(by_url):
                break
        return self.fallback.choose(candidates)  # unreachable with load_factor >= 1; kept for safety


def make_policy(name: str, *, prefix_chars: int = DEFAULT_PREFIX_CHARS, seed: int | None = None) -> Policy:
    rng = random.Random(seed)
    if name == "least-loaded":
        return LeastLoaded(rng)
    if name == "round-robin":
        return RoundRobin()
    if name == "prefix-aware":
        return PrefixAware(prefix_chars=prefix_chars, rng=rng)
    raise ValueError(f"unknown policy {name!r} (choose one of {', '.join(POLICIES)})")
