"""NIXL KV transport (optional): KV bytes move through NIXL (UCX underneath: RDMA when the node has a NIC for
it, TCP otherwise); control stays on the TCP transport's authenticated channel.

    pip install nixl-cu12 && pip install nixl --no-deps      # (the `nixl` extra of baton)

Per pull, the decode worker registers a receive buffer (all layers) with its NIXL agent and sends a PULL over
the TCP control connection (same handshake, HMAC auth, timeouts, errors as `tcp`) carrying its agent
metadata and the buffer's address. The prefill worker, layer by layer as `wait_layer` allows, registers the
layer's K/V, NIXL-WRITEs them into the decode worker's buffer and, once NIXL reports the write done, sends a
zero-length LAYER frame with the payload checksum on the control connection; the decode side verifies it and
writes the layer into its cache while later layers are still in flight. A peer that dies fails the control
connection, so failures are as fast and as clean as with `tcp`.

`nixl` is imported lazily: without it, `check_available()` raises NIXLUnavailable (with the reason) and
`--kv-transport auto` falls back to TCP. What UCX actually uses is reported as
`baton_kv_transport_info{transport="ucx-tcp"|"rdma"}`.
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import nixl_progress
from ..engine.types import KVTransferFailed
from .base import KVLayout, KVSink, KVSource, kv_failure
from .tcp import (
    DONE,
    DTYPE_CODES,
    HEADER,
    LAYER,
    MAGIC,
    VERSION,
    TCPKVTransport,
    _Conn,
    _PullCtx,
    byte_view,
    checksum,
    pack,
)

log = logging.getLogger("baton.worker.kv.nixl")

NIXL_PULL = 11  # a PULL whose data goes through NIXL


class NIXLUnavailable(KVTransferFailed):
    """NIXL is not installed or cannot start here (the message says why)."""


def _import_nixl():
    """NIXL's agent and config classes, its progress thread given a poll timeout first (`nixl_progress`: without
    one, NIXL's thread spins a core per worker, idle or busy)."""
    try:
        from nixl import _api
    except ImportError as exc:
        raise NIXLUnavailable(
            f"NIXL is not installed ({exc}); install it with `pip install nixl-cu12 && pip install nixl "
            "--no-deps` (UCX comes with it) or use --kv-transport tcp") from None
    try:
        nixl_progress.calm_nixl_progress_thread(_api, nixl_progress.delay_from_env())
    except nixl_progress.BadDelay as exc:
        raise NIXLUnavailable(str(exc)) from None
    return _api.nixl_agent, _api.nixl_agent_config


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when NIXL imports and an agent with the UCX backend starts here; else why not."""
    try:
        nixl_agent, nixl_agent_config = _import_nixl()
        agent = nixl_agent(f"baton-probe-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=["UCX"]))
        if "UCX" not in agent.backends:
            return f"NIXL has no UCX backend here (plugins: {', '.join(agent.plugin_list) or 'none'})"
        del agent
        return None
    except NIXLUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure to start means "not usable"
        return f"a NIXL agent with the UCX backend does not start here: {type(exc).__name__}: {exc}"


def check_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise NIXLUnavailable(reason)


def ucx_transport() -> str:
    """What UCX will move bytes over: `rdma` when an RDMA device exists and UCX_TLS allows it, else `ucx-tcp`."""
    tls = os.environ.get("UCX_TLS", "").lower()
    ib = Path("/sys/class/infiniband")
    has_rdma = ib.is_dir() and any(ib.iterdir())
    rdma_tls = not tls or "all" in tls or any(t in tls for t in ("rc", "ud", "dc", "ib", "roce"))
    return "rdma" if has_rdma and rdma_tls else "ucx-tcp"


@dataclass
class _Posted:
    layer: int
    handle: object
    regs: list
    checksum: int
    keep: object  # the layer's tensors, alive until NIXL is done with them
    state: str


class NIXLKVTransport(TCPKVTransport):
    name = "nixl"
    server_frames = (*TCPKVTransport.server_frames, NIXL_PULL)

    def __init__(self, host: str | None = None, port: int = 14579, *, xfer_timeout: float = 30.0,
                 max_inflight_layers: int = 8, **kw) -> None:
        nixl_agent, nixl_agent_config = _import_nixl()
        super().__init__(host, port, **kw)
        self.agent_name = f"baton-{uuid.uuid4().hex[:12]}"
        try:
            self.agent = nixl_agent(self.agent_name, nixl_agent_config(backends=["UCX"]))
        except Exception as exc:  # noqa: BLE001
            raise NIXLUnavailable(f"cannot start a NIXL agent: {type(exc).__name__}: {exc}") from None
        if "UCX" not in self.agent.backends:
            raise NIXLUnavailable("NIXL has no UCX backend here")
        self.xfer_timeout = xfer_timeout
        self.max_inflight_layers = max_inflight_layers
        self._agent_lock = threading.Lock()  # the agent is not thread-safe in the default sync mode
        self._remote_agents: dict[bytes, str] = {}
        self._transport = ucx_transport()

    @property
    def transport(self) -> str:
        return self._transport

    # -- decode side ----------------------------------------------------------------------------------------
    def _pull_on(self, conn: _Conn, lease_id: str, sink: KVSink, ctx: _PullCtx, reused: bool) -> int:
        layout = sink.layout
        n, L = len(sink.block_ids), layout.num_layers
        per_layer = layout.layer_nbytes(n)
        buf = torch.empty((L, 2, n, layout.block_size, layout.num_kv_heads, layout.head_dim),
                          dtype=layout.torch_dtype)
        with self._agent_lock:
            reg = self.agent.get_reg_descs(buf)
            self.agent.register_memory(reg)
        try:
            req = next(self._req_ids) & 0xFFFFFFFF
            body = json.dumps({
                "lease_id": lease_id, "num_blocks": n, "layout": layout.to_dict(),
                "agent": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                "addr": buf.data_ptr(), "layer_nbytes": per_layer,
            }).encode()
            self._send(conn, [pack(NIXL_PULL, body, req=req)], ctx)
            checks: list[concurrent.futures.Future] = []
            total = 0
            try:
                for layer in range(L):
                    what = f"layer {layer}/{L}"
                    f, _ = self._recv_frame(conn, (LAYER,), ctx, what)
                    if f.layer != layer or f.req != req or f.nblocks != n:
                        raise kv_failure(f"NIXL peer {conn.peer} announced an unexpected layer ({f.layer})",
                                         "protocol")
                    checks.append(self._write_pool.submit(self._verify, layer, (byte_view(buf[layer]),),
                                                          f.checksum, conn.algo, sink, buf[layer]))
                    total += per_layer
                for c in checks:
                    c.result()
            finally:
                concurrent.futures.wait(checks)
            self._send(conn, [pack(DONE, b'{"ok":true}', req=req)], ctx)
            return total
        finally:
            with self._agent_lock:
                self.agent.deregister_memory(reg)

    # -- prefill side ---------------------------------------------------------------------------------------
    async def _serve_conn_frame(self, loop, sock, peer, f, payload, algo) -> bool:
        if f.ftype != NIXL_PULL:
            return False
        await self._serve_nixl_pull(loop, sock, peer, f, payload, algo)
        return True

    def _remote(self, metadata: bytes) -> str:
        with self._agent_lock:
            name = self._remote_agents.get(metadata)
            if name is None:
                name = self.agent.add_remote_agent(metadata)
                self._remote_agents[metadata] = name
        return name

    def _post_layer(self, source: KVSource, lease, layer: int, dtype, algo: int, remote: str, addr: int):
        """Read, checksum, register and post the NIXL WRITE of one layer (does not wait for it)."""
        k, v = source.read_layer(lease, layer)
        k = k.detach().to("cpu", dtype).contiguous()
        v = v.detach().to("cpu", dtype).contiguous()
        ck = checksum(algo, (byte_view(k), byte_view(v)))
        kb = k.numel() * k.element_size()
        with self._agent_lock:
            regs = [self.agent.get_reg_descs(k), self.agent.get_reg_descs(v)]
            for r in regs:
                self.agent.register_memory(r)
            handle = None
            try:
                local = self.agent.get_xfer_descs([k, v])
                remote_descs = self.agent.get_xfer_descs([(addr, kb, 0), (addr + kb, kb, 0)], "DRAM")
                handle = self.agent.initialize_xfer("WRITE", local, remote_descs, remote)
                state = self.agent.transfer(handle)
            except Exception:
                self._finish(_Posted(layer, handle, regs, ck, (k, v), "ERR"))
                raise
        return _Posted(layer, handle, regs, ck, (k, v), state)

    def _poll(self, p: _Posted) -> str:
        if p.state == "PROC":
            with self._agent_lock:
                p.state = self.agent.check_xfer_state(p.handle)
        return p.state

    def _wait(self, p: _Posted) -> None:
        deadline = time.monotonic() + self.xfer_timeout
        spins = 0
        while self._poll(p) == "PROC":
            if time.monotonic() > deadline:
                raise kv_failure(f"NIXL write of layer {p.layer} timed out after {self.xfer_timeout}s", "timeout")
            spins += 1
            time.sleep(0 if spins < 2000 else 0.00005)

    def _finish(self, p: _Posted) -> None:
        with self._agent_lock:
            if p.handle is not None:
                with contextlib.suppress(Exception):
                    self.agent.release_xfer_handle(p.handle)
            for r in p.regs:
                with contextlib.suppress(Exception):
                    self.agent.deregister_memory(r)
        p.handle, p.regs, p.keep = None, [], None

    async def _serve_nixl_pull(self, loop, sock, peer, f, payload, algo) -> None:
        source = self._source
        if source is None:
            raise kv_failure("this worker serves no KV leases (not a prefill worker)", "lease")
        try:
            req = json.loads(payload)
            lease_id, n = str(req["lease_id"]), int(req["num_blocks"])
            theirs = KVLayout(**req["layout"])
            metadata, addr, per_layer = base64.b64decode(req["agent"]), int(req["addr"]), int(req["layer_nbytes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise kv_failure(f"malformed NIXL PULL request: {exc}", "protocol") from None
        layout = source.layout
        if theirs != layout:
            raise kv_failure(f"KV layout mismatch between prefill ({layout}) and decode ({theirs}) workers",
                             "layout")
        if per_layer != layout.layer_nbytes(n):
            raise kv_failure("NIXL PULL: receive buffer size does not match the layout", "protocol")
        remote = await loop.run_in_executor(self._read_pool, self._remote, metadata)
        lease = source.acquire(lease_id)
        completed = False
        inflight: deque[_Posted] = deque()
        try:
            if len(lease.block_ids) != n:
                raise kv_failure(f"lease {lease_id} has {len(lease.block_ids)} blocks, the decode side "
                                 f"allocated {n}", "protocol")
            code = DTYPE_CODES[layout.dtype]

            async def announce(p: _Posted) -> None:  # the layer landed: tell the decode side
                if p.state == "PROC":
                    await loop.run_in_executor(self._read_pool, self._wait, p)
                state = p.state
                self._finish(p)
                if state != "DONE":
                    raise kv_failure(f"NIXL write of layer {p.layer} failed ({state})", "connection")
                hdr = HEADER.pack(MAGIC, VERSION, LAYER, code, algo, f.req, p.layer, n, layout.block_size,
                                  layout.num_kv_heads, layout.head_dim, 0, p.checksum)
                await self._asend(loop, sock, (hdr,), peer)

            for layer in range(layout.num_layers):
                await source.wait_layer(lease_id, layer)
                inflight.append(await loop.run_in_executor(
                    self._read_pool, self._post_layer, source, lease, layer, layout.torch_dtype, algo, remote,
                    addr + layer * per_layer))
                while inflight and (len(inflight) > self.max_inflight_layers or self._poll(inflight[0]) != "PROC"):
                    await announce(inflight.popleft())
            while inflight:
                await announce(inflight.popleft())
            await self._arecv_frame(loop, sock, peer, self.io_timeout, (DONE,))
            completed = True
        finally:
            for p in inflight:  # a failed pull: wait for posted writes before freeing their memory
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._read_pool, self._wait, p)
                self._finish(p)
            source.release(lease_id, completed=completed)
