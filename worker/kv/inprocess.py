"""In-process KV transport: engines in one process find each other through a registry (tests, demos).

Copies are real tensor copies layer by layer (source blocks -> destination blocks), done in a worker thread
so the event loop stays free, so the engines exercise exactly the path a network backend uses.
"""
from __future__ import annotations

import asyncio
import time

from ..engine.types import KVTransferFailed
from .base import KVSink, KVSource, KVTransport, TransferStats, layout_from_params


class InProcessRegistry:
    """engine_id -> KVSource. One default registry per process; tests may make their own."""

    def __init__(self) -> None:
        self._sources: dict[str, KVSource] = {}

    def register(self, source: KVSource) -> None:
        self._sources[source.engine_id] = source

    def unregister(self, engine_id: str) -> None:
        self._sources.pop(engine_id, None)

    def get(self, engine_id: str) -> KVSource:
        try:
            return self._sources[engine_id]
        except KeyError:
            raise KVTransferFailed(f"prefill engine {engine_id!r} is not reachable (not in this process)") from None


DEFAULT_REGISTRY = InProcessRegistry()


class InProcessKVTransport(KVTransport):
    name = "inprocess"

    def __init__(self, registry: InProcessRegistry | None = None) -> None:
        self.registry = registry or DEFAULT_REGISTRY
        self._source: KVSource | None = None

    async def start(self, source: KVSource | None) -> None:
        self._source = source
        if source is not None:
            self.registry.register(source)

    async def stop(self) -> None:
        if self._source is not None:
            self.registry.unregister(self._source.engine_id)
            self._source = None

    def address(self) -> tuple[str, int]:
        return ("inprocess", 0)

    async def pull(self, params: dict, sink: KVSink) -> TransferStats:
        source = self.registry.get(str(params.get("remote_engine_id")))
        remote_layout = layout_from_params(params) or source.layout
        sink.layout.check_compatible(remote_layout)
        lease_id = str(params.get("remote_request_id"))
        t0 = time.perf_counter()
        lease = source.acquire(lease_id)
        completed = False
        try:
            if len(lease.block_ids) != len(sink.block_ids):
                raise KVTransferFailed(f"lease {lease_id} has {len(lease.block_ids)} blocks, the decode side "
                                       f"allocated {len(sink.block_ids)}")
            nbytes = 0
            for layer in range(sink.layout.num_layers):
                await source.wait_layer(lease_id, layer)
                k, v = await asyncio.to_thread(source.read_layer, lease, layer)
                await asyncio.to_thread(sink.write_layer, layer, k, v)
                nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
            completed = True
        finally:
            source.release(lease_id, completed=completed)
        return TransferStats(num_bytes=nbytes, seconds=time.perf_counter() - t0,
                             num_layers=sink.layout.num_layers, transport=self.name)

    async def release(self, params: dict) -> None:
        try:
            source = self.registry.get(str(params.get("remote_engine_id")))
        except KVTransferFailed:
            return
        source.release(str(params.get("remote_request_id")), completed=True)
