"""KV transfer throughput between two processes over loopback: Baton's TCP transport vs a raw socket loop vs
NIXL (UCX over TCP), all in one run.

    python benchmarks/kv_transfer.py                       # 256 MiB, 4 rounds x 3 runs per method
    python benchmarks/kv_transfer.py --mib 64 --rounds 2 --with-baton-nixl

Payload: one request's KV cache, `--layers` layers x N blocks (block 16 tokens x 8 KV heads x 128 head dim,
float16), N chosen so the total is `--mib`. Each method runs as a server ("prefill") process and a client
("decode") process; the client does a warm-up transfer (checked byte for byte), then times `--runs` transfers,
request -> every byte in place:

- baton-tcp: `TCPKVTransport.pull` of a lease (HMAC handshake done once, pooled connection, layer-wise
  frames, xxh3 checksums verified, received straight into the destination cache blocks). The source's
  `read_layer` returns views of its cache (the blocks are one contiguous run, as an engine's fresh
  allocation usually is); `--gather` makes it copy them with `index_select` as the engine does.
- baton-tcp-nocheck (with `--with-nocheck`): the same without payload checksums (BATON_KV_CHECKSUM=none),
  to show what the xxh3 integrity check costs (CPU on both sides, which share 2 cores here).
- raw-socket: one `sendall` of a preallocated buffer, `recv_into` a preallocated buffer (no framing, no
  checksum): the ceiling of what Python can do over this socket.
- nixl-ucx-tcp: NIXL READ of the same bytes (one descriptor per layer for K and for V), UCX_TLS=tcp.
- baton-nixl (with `--with-baton-nixl`): Baton's NIXL transport (TCP control + NIXL WRITE per layer).

Rounds are interleaved (A, B, C, A, B, C, ...) so background noise hits all alike, and only one method's
processes exist at a time (NIXL's progress threads spin, which would slow the others on a small machine);
medians over every timed run are printed with the ratios the transport must meet (>= 0.9x raw socket,
>= 1.0x NIXL-TCP).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UCX_TLS", "tcp")  # NIXL over UCX's TCP transport (no shared-memory shortcut)

BLOCK, HEADS, HEAD_DIM, DTYPE = 16, 8, 128, "float16"
SECRET = "bench-secret"


def layout_for(mib: int, layers: int):
    from baton.worker.kv.base import KVLayout

    layout = KVLayout(layers, BLOCK, HEADS, HEAD_DIM, DTYPE)
    blocks = max(1, (mib << 20) // (layers * layout.layer_nbytes(1)))
    return layout, blocks


def make_cache(layout, blocks, fill: bool):
    import torch

    shape = (blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    out = []
    for i in range(layout.num_layers):
        if fill:
            g = torch.Generator().manual_seed(i)
            k = torch.randn(shape, generator=g).to(layout.torch_dtype)
            v = torch.randn(shape, generator=g).to(layout.torch_dtype)
        else:
            k, v = torch.zeros(shape, dtype=layout.torch_dtype), torch.zeros(shape, dtype=layout.torch_dtype)
        out.append((k, v))
    return out


# -- servers (each its own process) -------------------------------------------------------------------------
def baton_server(conn, mib: int, layers: int, gather: bool, nixl: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from baton.worker.engine.leases import LeaseTable

    layout, blocks = layout_for(mib, layers)
    cache = make_cache(layout, blocks, fill=True)

    class Source:
        engine_id = "bench"

        def __init__(self):
            self.layout = layout
            self.leases = LeaseTable(300)

        def acquire(self, lease_id):
            if lease_id not in self.leases._leases:
                self.leases.create(lease_id, list(range(blocks)), blocks * BLOCK)
            return self.leases.acquire(lease_id)

        async def wait_layer(self, lease_id, layer):
            return None

        def read_layer(self, lease, layer):
            k, v = cache[layer]
            if gather:
                idx = torch.tensor(lease.block_ids)
                return k.index_select(0, idx), v.index_select(0, idx)
            return k[lease.block_ids[0]:lease.block_ids[-1] + 1], v[lease.block_ids[0]:lease.block_ids[-1] + 1]

        def release(self, lease_id, completed=True):
            self.leases.release(lease_id, completed)
            self.leases.collect()

    async def main():
        if nixl:
            from baton.worker.kv.nixl import NIXLKVTransport as T
        else:
            from baton.worker.kv.tcp import TCPKVTransport as T
        t = T("127.0.0.1", 0, bind_host="127.0.0.1", secret=SECRET)
        await t.start(Source())
        conn.send(t.address()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await t.stop()

    asyncio.run(main())


def raw_server(conn, nbytes: int) -> None:
    buf = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    view = memoryview(buf)
    lsock = socket.create_server(("127.0.0.1", 0))
    conn.send(lsock.getsockname()[1])
    c, _ = lsock.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while c.recv(1):
        c.sendall(view)


def nixl_server(conn, mib: int, layers: int) -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    layout, blocks = layout_for(mib, layers)
    cache = make_cache(layout, blocks, fill=True)
    agent = nixl_agent("bench-target", nixl_agent_config(backends=["UCX"]))
    tensors = [t for kv in cache for t in kv]
    agent.register_memory(agent.get_reg_descs(tensors))
    conn.send((agent.get_agent_metadata(), agent.get_serialized_descs(agent.get_xfer_descs(tensors))))
    conn.recv()


# -- clients (this process) ---------------------------------------------------------------------------------
class Sink:
    def __init__(self, layout, blocks):
        self.layout = layout
        self.block_ids = list(range(blocks))
        self.cache = make_cache(layout, blocks, fill=False)

    def direct_layer(self, layer):
        return self.cache[layer]

    def write_layer(self, layer, k, v):
        self.cache[layer][0].copy_(k)
        self.cache[layer][1].copy_(v)


class BatonClient:
    def __init__(self, port, layout, blocks, nixl: bool, checksum: str = "xxh3"):
        if nixl:
            from baton.worker.kv.nixl import NIXLKVTransport as T
        else:
            from baton.worker.kv.tcp import TCPKVTransport as T
        self.t = T("127.0.0.1", 0, secret=SECRET, serve=False, checksum=checksum)
        self.port, self.layout, self.blocks = port, layout, blocks
        self.sink = Sink(layout, blocks)
        self.n = 0
        self.loop = asyncio.new_event_loop()

    def run(self) -> float:
        self.n += 1
        params = {"remote_host": "127.0.0.1", "remote_port": self.port, "remote_request_id": f"r{self.n}",
                  "remote_block_ids": self.sink.block_ids, "kv_layout": self.layout.to_dict()}
        t0 = time.perf_counter()
        self.loop.run_until_complete(self.t.pull(params, self.sink))
        return time.perf_counter() - t0

    def check(self, reference) -> bool:
        import torch

        return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(self.sink.cache, reference))


class RawClient:
    def __init__(self, port, nbytes):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(nbytes)
        self.view = memoryview(self.buf)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(b"x")
        got, n = 0, len(self.view)
        while got < n:
            r = self.sock.recv_into(self.view[got:])
            if not r:
                raise RuntimeError("raw server closed")
            got += r
        return time.perf_counter() - t0


class NixlClient:
    def __init__(self, md, descs, layout, blocks):
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent = nixl_agent("bench-init", nixl_agent_config(backends=["UCX"]))
        self.remote = self.agent.add_remote_agent(md)
        self.remote_descs = self.agent.deserialize_descs(descs)
        self.cache = make_cache(layout, blocks, fill=False)
        tensors = [t for kv in self.cache for t in kv]
        self.agent.register_memory(self.agent.get_reg_descs(tensors))
        self.local_descs = self.agent.get_xfer_descs(tensors)

    def run(self) -> float:
        t0 = time.perf_counter()
        h = self.agent.initialize_xfer("READ", self.local_descs, self.remote_descs, self.remote)
        state = self.agent.transfer(h)
        while state == "PROC":
            state = self.agent.check_xfer_state(h)
        dt = time.perf_counter() - t0
        self.agent.release_xfer_handle(h)
        if state != "DONE":
            raise RuntimeError(f"NIXL transfer failed: {state}")
        return dt

    def check(self, reference) -> bool:
        import torch

        return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(self.cache, reference))


def client_main(conn, method: str, server_info, mib: int, layers: int, runs: int) -> None:
    """One client process: warm-up (+ correctness check), then `runs` timed transfers; sends the times."""
    import torch

    torch.set_num_threads(1)
    layout, blocks = layout_for(mib, layers)
    nbytes = layout.num_layers * layout.layer_nbytes(blocks)
    if method == "raw-socket":
        c = RawClient(server_info, nbytes)
    elif method == "nixl-ucx-tcp":
        c = NixlClient(*server_info, layout, blocks)
    else:
        c = BatonClient(server_info, layout, blocks, nixl=method == "baton-nixl",
                        checksum="none" if method == "baton-tcp-nocheck" else "xxh3")
    c.run()
    if hasattr(c, "check") and not c.check(make_cache(layout, blocks, fill=True)):
        conn.send(RuntimeError(f"{method}: received data differs from the source"))
        return
    conn.send([c.run() for _ in range(runs)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="KV payload per transfer (MiB, default 256)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each starts fresh processes per method")
    ap.add_argument("--runs", type=int, default=3, help="timed transfers per method per round (after a warm-up)")
    ap.add_argument("--gather", action="store_true", help="the source copies blocks with index_select (engine)")
    ap.add_argument("--no-nixl", action="store_true")
    ap.add_argument("--with-baton-nixl", action="store_true", help="also time Baton's NIXL transport")
    ap.add_argument("--with-nocheck", action="store_true",
                    help="also time Baton's TCP transport without payload checksums (BATON_KV_CHECKSUM=none)")
    args = ap.parse_args()

    layout, blocks = layout_for(args.mib, args.layers)
    nbytes = layout.num_layers * layout.layer_nbytes(blocks)
    ctx = mp.get_context("spawn")
    methods = ["baton-tcp", "raw-socket"] + (["baton-tcp-nocheck"] if args.with_nocheck else [])
    if not args.no_nixl:
        from baton.worker.kv.nixl import unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            methods.append("nixl-ucx-tcp")
            if args.with_baton_nixl:
                methods.append("baton-nixl")
        else:
            print(f"NIXL skipped: {reason}")
    print(f"payload: {nbytes / 2**20:.0f} MiB = {args.layers} layers x {blocks} blocks x (K+V) "
          f"[{BLOCK}x{HEADS}x{HEAD_DIM} {DTYPE}]; {args.rounds} rounds x {args.runs} runs per method; "
          f"UCX_TLS={os.environ.get('UCX_TLS')}", flush=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:  # only this method's two processes exist while it runs (NIXL's progress
            # threads spin, which would slow the others down on a small machine)
            server_conn, child = ctx.Pipe()
            if method == "raw-socket":
                server = ctx.Process(target=raw_server, args=(child, nbytes), daemon=True)
            elif method == "nixl-ucx-tcp":
                server = ctx.Process(target=nixl_server, args=(child, args.mib, args.layers), daemon=True)
            else:
                server = ctx.Process(target=baton_server, args=(child, args.mib, args.layers, args.gather,
                                                                method == "baton-nixl"), daemon=True)
            server.start()
            try:
                info = server_conn.recv()
                client_conn, cchild = ctx.Pipe()
                client = ctx.Process(target=client_main, args=(cchild, method, info, args.mib, args.layers,
                                                               args.runs), daemon=True)
                client.start()
                got = client_conn.recv()
                client.join(30)
                if isinstance(got, Exception):
                    raise SystemExit(str(got))
                times[method] += got
            finally:
                with contextlib.suppress(Exception):
                    server_conn.send("stop")
                server.join(5)
                if server.is_alive():
                    server.kill()

    mibs = {name: nbytes / 2**20 / statistics.median(ts) for name, ts in times.items()}
    print(f"{'method':<14} {'median MiB/s':>13} {'min MiB/s':>10} {'max MiB/s':>10}")
    for name, ts in times.items():
        print(f"{name:<14} {mibs[name]:>13.0f} {nbytes / 2**20 / max(ts):>10.0f} {nbytes / 2**20 / min(ts):>10.0f}")
    ours = mibs["baton-tcp"]
    print(f"baton-tcp / raw-socket    = {ours / mibs['raw-socket']:.2f}x  (goal >= 0.9x)")
    if "nixl-ucx-tcp" in mibs:
        print(f"baton-tcp / nixl-ucx-tcp  = {ours / mibs['nixl-ucx-tcp']:.2f}x  (goal >= 1.0x)")
    if "baton-tcp-nocheck" in mibs:
        print(f"baton-tcp-nocheck / raw-socket = {mibs['baton-tcp-nocheck'] / mibs['raw-socket']:.2f}x")
    if "baton-nixl" in mibs:
        print(f"baton-nixl / nixl-ucx-tcp = {mibs['baton-nixl'] / mibs['nixl-ucx-tcp']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
