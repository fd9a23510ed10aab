"""KV cache handoff between prefill and decode workers (part of Baton; installed as `baton.worker.kv`)."""
from .base import KVLayout, KVLease, KVSink, KVSource, KVTransport, TransferStats, layout_from_params

__all__ = ["KVLayout", "KVLease", "KVSink", "KVSource", "KVTransport", "TransferStats", "layout_from_params"]
