"""The KV transport interface.

Two sides, both per request and per layer:

- export (prefill worker): the engine implements `KVSource`. After a prefill hop it holds the request's
  blocks under a lease (`KVLease`); a transport serves `read_layer(lease, layer)` for it and calls `release`
  when the decode side has everything (or the engine expires the lease).
- import (decode worker): the engine allocates blocks and hands the transport a `KVSink`; the transport
  fetches the remote blocks layer by layer and `write_layer`s them. `KVTransport.pull` returns when every
  layer is in place.

Everything is expressed per layer and per block list with explicit layout metadata (`KVLayout`: dtype, block
size, heads, head_dim), so a network backend can preallocate one buffer per layer (`layout.layer_nbytes`),
`recv_into` it, and overlap the transfer of layer i with later layers (`KVSource.wait_layer` is where a
source that is still computing can block a streaming reader). Backends: `inprocess` (engines in one
process; tests), next TCP (asyncio, layer-wise streaming) and NIXL.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ..engine.types import KVTransferFailed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one layer's K (and V) cache per block: `[block_size, num_kv_heads, head_dim]` of `dtype`."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of K (or of V) for one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    def layer_nbytes(self, num_blocks: int) -> int:
        """Bytes of K+V of `num_blocks` blocks in one layer (what one layer's message carries)."""
        return 2 * num_blocks * self.block_nbytes

    def to_dict(self) -> dict:
        return asdict(self)

    def check_compatible(self, other: KVLayout) -> None:
        if self != other:
            raise KVTransferFailed(f"KV layout mismatch between prefill ({other}) and decode ({self}) workers")


def layout_from_params(params: dict) -> KVLayout | None:
    raw = params.get("kv_layout")
    if not raw:
        return None
    try:
        return KVLayout(**raw)
    except TypeError as exc:
        raise KVTransferFailed(f"bad kv_layout in kv_transfer_params: {exc}") from None


@dataclass
class KVLease:
    """KV blocks a prefill worker keeps for one request until pulled or expired."""

    lease_id: str  # == kv_transfer_params["remote_request_id"]
    block_ids: list[int]
    num_tokens: int  # tokens whose K/V the blocks hold (the prompt)
    expires_at: float  # time.monotonic()
    pinned: int = 0  # transfers in progress; a pinned lease does not expire
    pull_started: float | None = None  # time.monotonic() of the first pull (the `kv_export` span's start)


@dataclass
class TransferStats:
    num_bytes: int
    seconds: float
    num_layers: int
    transport: str


class KVSource(Protocol):
    """Export side, implemented by the prefill engine. Methods may be called from any thread."""

    engine_id: str
    layout: KVLayout

    def acquire(self, lease_id: str) -> KVLease:
        """Pin the lease for a transfer; raises KVTransferFailed if unknown or expired."""
        ...

    async def wait_layer(self, lease_id: str, layer: int) -> None:
        """Return once `layer` of the lease is computed (immediately for a finished prefill)."""
        ...

    def read_layer(self, lease: KVLease, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the lease's blocks in `layer`: `[len(block_ids), block_size, kv_heads, head_dim]`."""
        ...

    def release(self, lease_id: str, completed: bool = True) -> None:
        """Unpin; `completed=True` frees the blocks (the decode side has them all)."""
        ...


class KVSink(Protocol):
    """Import side for one request, implemented by the decode engine (its own freshly allocated blocks).

    A sink may also offer `direct_layer(layer) -> (k, v) | None`: writable, contiguous views of its own
    destination blocks in `layer` (`[len(block_ids), block_size, kv_heads, head_dim]`), when they are one
    contiguous run. A network backend then receives straight into the cache (no staging buffer, no copy) and
    does not call `write_layer` for that layer."""

    layout: KVLayout
    block_ids: list[int]  # destination blocks, same count and order as the remote ones

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


#: `baton_kv_transfer_seconds` buckets (a transfer is one request's whole KV, every layer)
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: `baton_kv_transfer_failures_total{reason}` values (all present from the start, so rate() works at once)
FAILURE_REASONS = ("auth", "timeout", "connection", "integrity", "lease", "layout", "protocol", "cancelled",
                   "other")


def kv_failure(message: str, reason: str) -> KVTransferFailed:
    """A KVTransferFailed that carries the `reason` label of baton_kv_transfer_failures_total."""
    exc = KVTransferFailed(message)
    exc.reason = reason if reason in FAILURE_REASONS else "other"
    return exc


def failure_reason(exc: BaseException) -> str:
    """The metric reason of a failed import (explicit `reason`, else guessed from the message)."""
    reason = getattr(exc, "reason", None)
    if reason in FAILURE_REASONS:
        return reason
    msg = str(exc).lower()
    for words, reason in ((("expired", "unknown", "already pulled", "lease"), "lease"),
                          (("layout",), "layout"), (("authenticat", "secret"), "auth"),
                          (("timed out", "timeout"), "timeout"), (("integrity", "checksum"), "integrity"),
                          (("cancel",), "cancelled"),
                          (("reachable", "connection", "closed", "refused"), "connection")):
        if any(w in msg for w in words):
            return reason
    return "other"


class TransferHistogram:
    """Cumulative histogram of transfer durations, kept by the engine and read at scrape time."""

    def __init__(self, buckets: tuple[float, ...] = KV_TRANSFER_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # last: > every bound

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self._counts[i] += 1
                return
        self._counts[-1] += 1

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """((le, count of observations <= le), ..., (inf, total))."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self._counts):
            total += n
            out.append((bound, total))
        return tuple(out)


class KVTransport(abc.ABC):
    """One backend. An engine owns one instance: `start(source)` serves its leases (prefill side, may be None
    on a pure decode worker), `pull` imports a remote request's KV (decode side)."""

    #: the backend (`tcp`, `nixl`, `inprocess`)
    name: str = "abstract"

    @property
    def transport(self) -> str:
        """What actually moves the bytes, reported as `baton_kv_transport_info{transport=...}` (`tcp`,
        `ucx-tcp`, `rdma`, ...), so that a silent RDMA -> TCP fallback is visible. Default: `name`."""
        return self.name

    @abc.abstractmethod
    async def start(self, source: KVSource | None) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def address(self) -> tuple[str, int]:
        """(remote_host, remote_port) that a decode worker uses to reach this worker's leases."""

    @abc.abstractmethod
    async def pull(self, params: dict, sink: KVSink) -> TransferStats:
        """Fetch every layer of the remote lease named by `params` into `sink`, then let the remote free it.
        Raises KVTransferFailed (peer unreachable, lease unknown/expired, layout mismatch)."""

    @abc.abstractmethod
    async def release(self, params: dict) -> None:
        """Tell the remote worker its lease is no longer needed (the decode side will not pull it)."""
