"""Prefill role: KV blocks held for the decode worker under a lease (until pulled, released or expired).

The table is shared between the engine thread (creates leases, frees blocks of expired/released ones) and
KV transports (acquire/read/release from any thread), hence the lock. Blocks are only ever freed by the
engine thread (`collect`), and never while a transfer has the lease pinned.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..kv.base import KVLease
from .types import KVTransferFailed


class LeaseTable:
    def __init__(self, ttl_seconds: float = 30.0, on_release: Callable[[], None] | None = None) -> None:
        self.ttl = ttl_seconds
        self._leases: dict[str, KVLease] = {}
        self._done: list[str] = []  # released (pulled) leases whose blocks the engine thread must free
        self._lock = threading.Lock()
        self._on_release = on_release  # wakes the engine loop
        #: (lease id, first pull's start, now) once a transport has shipped a lease (time.monotonic()): the
        #: prefill worker's `kv_export` trace span (`worker/request_trace.py`); None unless tracing is on
        self.on_exported: Callable[[str, float, float], None] | None = None
        self.expired_total = 0
        self.released_total = 0

    def __len__(self) -> int:
        return len(self._leases)

    def create(self, lease_id: str, block_ids: list[int], num_tokens: int) -> KVLease:
        lease = KVLease(lease_id, list(block_ids), num_tokens, time.monotonic() + self.ttl)
        with self._lock:
            self._leases[lease_id] = lease
        return lease

    def acquire(self, lease_id: str) -> KVLease:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease_id in self._done:
                raise KVTransferFailed(f"KV lease {lease_id!r} is unknown, already pulled or expired")
            if lease.expires_at <= time.monotonic() and not lease.pinned:
                raise KVTransferFailed(f"KV lease {lease_id!r} expired")
            lease.pinned += 1
            if lease.pull_started is None:
                lease.pull_started = time.monotonic()
            return lease

    def release(self, lease_id: str, completed: bool = True) -> None:
        exported = None
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return
            if lease.pinned:
                lease.pinned -= 1
            if completed and lease_id not in self._done:
                self._done.append(lease_id)
                exported = lease.pull_started
        if exported is not None and self.on_exported is not None:
            self.on_exported(lease_id, exported, time.monotonic())
        if completed and self._on_release is not None:
            self._on_release()

    def collect(self, now: float | None = None) -> list[list[int]]:
        """Engine thread: remove released and expired (unpinned) leases; return their block lists to free."""
        now = time.monotonic() if now is None else now
        out: list[list[int]] = []
        with self._lock:
            for lease_id in self._done:
                lease = self._leases.get(lease_id)
                if lease is not None and not lease.pinned:
                    del self._leases[lease_id]
                    out.append(lease.block_ids)
                    self.released_total += 1
            self._done = [i for i in self._done if i in self._leases]
            for lease_id, lease in list(self._leases.items()):
                if lease.expires_at <= now and not lease.pinned and lease_id not in self._done:
                    del self._leases[lease_id]
                    out.append(lease.block_ids)
                    self.expired_total += 1
        return out

    def has_released(self) -> bool:
        """Leases released by a transport whose blocks the engine thread has not freed yet."""
        return bool(self._done)

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((l.expires_at for l in self._leases.values()), default=None)

    def drain(self) -> list[list[int]]:
        with self._lock:
            out = [l.block_ids for l in self._leases.values()]
            self._leases.clear()
            self._done.clear()
        return out
