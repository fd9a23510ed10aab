"""TCP KV transport: the prefill worker serves its leases on `--kv-port`, decode workers pull them.

Wire format: length-prefixed frames, each a fixed 48-byte header (`HEADER`: magic `BTKV`, version, frame type,
dtype, checksum algorithm, request id, layer, block count, block shape, payload length, payload checksum)
followed by the payload. A pull streams one `LAYER` frame per layer (payload: K of every block, then V),
each sent as soon as `KVSource.wait_layer` says the layer is computed, so the decode side writes layer i
while the prefill side still computes (or reads) later ones. A LAYER frame's checksum (xxh3-64 of the
payload) follows its payload as an 8-byte trailer instead of sitting in the header: both sides then hash
each 1 MiB chunk right next to the kernel's copy of it, while it is in cache (2-3x cheaper than hashing a
whole layer from memory); control frames carry a crc32 in the header.

Hot path, no extra copies:
- prefill: `read_layer` in a worker thread (overlapping the send of the previous layer), then blocking
  `sendall`s of memoryviews over the tensors from a send thread (the kernel copies from the tensor memory);
- decode: blocking `recv_into` in a transfer thread, straight into the destination cache blocks when the sink
  offers them (`direct_layer`, one contiguous run) or else into one of two preallocated staging tensors
  (double buffering: layer i is written into the cache by a second thread while layer i+1 is received).
  Integrity: xxh3-64 (crc32 if `xxhash` is not installed on either side); a decode worker may ask for none
  (`checksum="none"`, env BATON_KV_CHECKSUM=none) on a trusted network: checksums cost CPU on both sides.

Peers authenticate each other with an HMAC-SHA256 challenge-response over nonces from both sides, keyed by
the shared secret in env BATON_KV_SECRET (a Kubernetes Secret); a mismatch is refused with a clear error on
both sides. Without a secret on both sides the transfer is allowed and a warning is logged once.

Every blocking step has a timeout (connect, handshake, each read, each send); a peer that dies mid-transfer
makes `pull` raise KVTransferFailed at once (the engine then frees the decode side's blocks), and the prefill
side unpins the lease (it expires as usual). The lease is released when the decode side acknowledges every
layer. Connections are pooled per peer and each pull uses one exclusively, so concurrent pulls from several
decode workers (or several requests of one) run in parallel.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import torch

from ..engine.types import KVTransferFailed
from .base import (
    KVLayout,
    KVSink,
    KVSource,
    KVTransport,
    TransferStats,
    failure_reason,
    kv_failure,
    layout_from_params,
)

try:  # ~10 GB/s; crc32 (~1.5 GB/s) would be slower than the network on loopback
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

log = logging.getLogger("baton.worker.kv.tcp")

DEFAULT_PORT = 14579
MAGIC = b"BTKV"
VERSION = 1
#: magic, version, frame type, dtype, checksum algorithm, request id, layer, num blocks, block size,
#: kv heads, head dim, payload length, payload checksum
HEADER = struct.Struct("!4sBBBBIIIIIIQQ")
HELLO, CHALLENGE, AUTH, AUTH_OK, PULL, LAYER, DONE, RELEASE, OK, ERROR = range(1, 11)
FRAME_NAMES = {HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", AUTH_OK: "AUTH_OK", PULL: "PULL",
               LAYER: "LAYER", DONE: "DONE", RELEASE: "RELEASE", OK: "OK", ERROR: "ERROR"}
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3}
CK_NONE, CK_XXH3, CK_CRC32 = 0, 1, 2
CHECKSUMS = {"xxh3": CK_XXH3, "crc32": CK_CRC32, "none": CK_NONE}
NONCE_BYTES = 32
MAX_CONTROL_PAYLOAD = 1 << 20
CAP_SECRET, CAP_XXH3, CAP_NOCHECK = 1, 2, 4

_warned_no_secret = False
_warn_lock = threading.Lock()


def _warn_no_secret() -> None:
    global _warned_no_secret
    with _warn_lock:
        if _warned_no_secret:
            return
        _warned_no_secret = True
    log.warning("BATON_KV_SECRET is not set: KV transfers between workers are not authenticated "
                "(set the same secret on every prefill and decode worker)")


@dataclass
class Frame:
    ftype: int
    dtype: int
    algo: int
    req: int
    layer: int
    nblocks: int
    block_size: int
    heads: int
    head_dim: int
    length: int
    checksum: int

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview, peer: str) -> Frame:
        magic, version, *rest = HEADER.unpack(raw)
        if magic != MAGIC:
            raise kv_failure(f"KV peer {peer} does not speak the Baton KV protocol (bad magic {magic!r})",
                             "protocol")
        if version != VERSION:
            raise kv_failure(f"KV peer {peer} speaks protocol version {version}, this worker {VERSION}",
                             "protocol")
        return cls(*rest)


def pack(ftype: int, payload: bytes = b"", *, req: int = 0) -> bytes:
    """A control frame (its small payload is crc32-checked)."""
    return HEADER.pack(MAGIC, VERSION, ftype, 0, CK_CRC32, req, 0, 0, 0, 0, 0, len(payload),
                       zlib.crc32(payload)) + payload


def error_payload(exc: BaseException) -> bytes:
    return json.dumps({"reason": failure_reason(exc), "message": str(exc)}).encode()


def raise_error_frame(payload: bytes, peer: str) -> None:
    try:
        d = json.loads(payload)
        message, reason = str(d["message"]), str(d.get("reason", "other"))
    except (ValueError, KeyError, TypeError):
        message, reason = payload.decode(errors="replace"), "other"
    raise kv_failure(f"KV peer {peer}: {message}", reason)


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


def hasher(algo: int):
    """A streaming checksum for `algo`, or None for CK_NONE."""
    if algo == CK_NONE:
        return None
    if algo == CK_XXH3:
        if xxhash is None:
            raise kv_failure("the KV peer checksums with xxh3 but `xxhash` is not installed here", "protocol")
        return xxhash.xxh3_64()
    return _Crc32()


TRAILER = struct.Struct("!Q")
CHUNK = 1 << 20  # payloads are checksummed and sent/received in chunks this size, while they are in cache


def checksum(algo: int, views) -> int:
    if algo == CK_NONE:
        return 0
    if algo == CK_XXH3:
        if xxhash is None:
            raise kv_failure("the KV peer checksums with xxh3 but `xxhash` is not installed here", "protocol")
        h = xxhash.xxh3_64()
        for v in views:
            h.update(v)
        return h.intdigest()
    c = 0
    for v in views:
        c = zlib.crc32(v, c)
    return c


def byte_view(t: torch.Tensor) -> memoryview:
    """A flat byte memoryview over a contiguous CPU tensor's memory (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def mac(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, b"baton-kv/" + label + b"/" + a + b, hashlib.sha256).digest()


def resolve_secret(secret) -> bytes | None:
    if secret is _FROM_ENV:
        secret = os.environ.get("BATON_KV_SECRET") or None
    if isinstance(secret, str):
        secret = secret.encode()
    return secret or None


_FROM_ENV = object()


class _PullCtx:
    """Lets the event loop abort a transfer thread (shut its socket down so a blocked recv returns)."""

    def __init__(self) -> None:
        self.aborted = False
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self.sock = sock
            if self.aborted:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)


class _Conn:
    """One authenticated client connection (blocking socket with timeouts), used by one pull at a time."""

    def __init__(self, sock: socket.socket, host: str, port: int, algo: int) -> None:
        self.sock = sock
        self.peer = f"{host}:{port}"
        self.key = (host, port)
        self.algo = algo
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Stale(Exception):
    """A pooled connection turned out to be closed by the peer before the pull started."""


class TCPKVTransport(KVTransport):
    """The TCP backend. `host` is the address advertised to decode workers (default: env POD_IP, else
    127.0.0.1), `port` the port to listen on (0: any free one; see `address()`), `bind_host` the interface
    (default: the advertised address if it is a loopback one, else 0.0.0.0). `secret`: the shared secret
    (default: env BATON_KV_SECRET; None disables auth). `serve=False` (a decode worker) never listens."""

    name = "tcp"
    #: frames a connection may send after the handshake (subclasses add theirs, see `_serve_conn_frame`)
    server_frames: tuple[int, ...] = (PULL, RELEASE)

    def __init__(self, host: str | None = None, port: int = DEFAULT_PORT, *, bind_host: str | None = None,
                 secret=_FROM_ENV, connect_timeout: float = 5.0, io_timeout: float = 30.0,
                 idle_timeout: float = 120.0, max_idle_per_peer: int = 8, max_concurrent_pulls: int = 32,
                 checksum: str | None = None, serve: bool = True) -> None:
        self.host = host or os.environ.get("POD_IP") or "127.0.0.1"
        self.port = int(port)
        # a loopback address is advertised on one machine only: listen there too, not on every interface
        self.bind_host = bind_host or (self.host if self.host.startswith("127.") or self.host == "::1"
                                       else "0.0.0.0")
        self.serve = serve
        self.secret = resolve_secret(secret)
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_peer = max_idle_per_peer
        kind = (checksum or os.environ.get("BATON_KV_CHECKSUM") or "xxh3").lower()
        if kind not in CHECKSUMS:
            raise ValueError(f"KV checksum must be one of {', '.join(CHECKSUMS)}, not {kind!r}")
        if kind == "xxh3" and xxhash is None:
            kind = "crc32"
        #: what this worker asks for as a decode side: xxh3 (default), crc32, or none (trusted network; the
        #: prefill side then skips it too)
        self.checksum = kind
        self.use_xxhash = xxhash is not None
        self._listen_sock: socket.socket | None = None
        self._source: KVSource | None = None
        self._accept_task: asyncio.Task | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._conn_socks: set[socket.socket] = set()  # the server's open connections (`stop` shuts them down)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._idle_lock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._pull_pool = concurrent.futures.ThreadPoolExecutor(max_concurrent_pulls, "baton-kv-pull")
        self._write_pool = concurrent.futures.ThreadPoolExecutor(max_concurrent_pulls, "baton-kv-write")
        self._read_pool = concurrent.futures.ThreadPoolExecutor(4, "baton-kv-read")
        self._send_pool = concurrent.futures.ThreadPoolExecutor(max_concurrent_pulls, "baton-kv-send")
        # tests: called with (layer, monotonic time) when a layer is in place on the decode side
        self.on_layer_received = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def _ensure_bound(self) -> socket.socket:
        if self._listen_sock is None:
            try:
                infos = socket.getaddrinfo(self.bind_host, self.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
                family, _, _, _, addr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(addr)
                    sock.listen(512)
                except OSError:
                    sock.close()
                    raise
            except OSError as exc:
                raise KVTransferFailed(f"cannot listen for KV transfers on {self.bind_host}:{self.port}: "
                                       f"{exc.strerror or exc}") from None
            sock.setblocking(False)
            self._listen_sock = sock
            self.port = sock.getsockname()[1]
        return self._listen_sock

    def address(self) -> tuple[str, int]:
        if self.serve:
            self._ensure_bound()
        return (self.host, self.port)

    async def start(self, source: KVSource | None) -> None:
        self._source = source
        if source is None or not self.serve:  # a pure decode worker serves nothing
            if self._listen_sock is not None:
                self._listen_sock.close()
                self._listen_sock = None
            return
        sock = self._ensure_bound()
        if self.secret is None:
            _warn_no_secret()
        if self._accept_task is None:
            self._accept_task = asyncio.create_task(self._accept_loop(sock), name="baton-kv-accept")
        log.info("serving KV leases over TCP on %s:%d (advertised as %s:%d)", self.bind_host, self.port,
                 self.host, self.port)

    async def stop(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
            self._accept_task = None
        for task in list(self._conn_tasks):
            task.cancel()
        # and shut their sockets: a cancel can be lost (Python 3.11's asyncio.wait_for returns the inner result
        # when a frame arrives as the cancel does, gh-86296), and the handler would then wait out idle_timeout
        # (120 s) for a client that keeps its connection pooled -- seen as 120 s test teardowns on a loaded CI
        # machine. A shut socket ends any read at once.
        for sock in list(self._conn_socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._listen_sock is not None:
            self._listen_sock.close()
            self._listen_sock = None
        with self._idle_lock:
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()
        self._source = None

    # -- server (prefill side, asyncio) -----------------------------------------------------------------------
    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("KV accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn_socks.add(conn)
            task = asyncio.create_task(self._serve_conn(conn, f"{addr[0]}:{addr[1]}"))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def _arecv_exact(self, loop, sock: socket.socket, n: int, peer: str) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r = await loop.sock_recv_into(sock, view[got:])
            if r == 0:
                raise kv_failure(f"KV peer {peer} closed the connection", "connection")
            got += r
        return buf

    async def _arecv_frame(self, loop, sock: socket.socket, peer: str, timeout: float | None,
                           expect: tuple[int, ...]) -> tuple[Frame, bytes]:
        async def recv() -> tuple[Frame, bytes]:
            f = Frame.parse(await self._arecv_exact(loop, sock, HEADER.size, peer), peer)
            if f.length > MAX_CONTROL_PAYLOAD:
                raise kv_failure(f"KV peer {peer} sent an oversized control frame ({f.length} bytes)", "protocol")
            payload = bytes(await self._arecv_exact(loop, sock, f.length, peer)) if f.length else b""
            if zlib.crc32(payload) != f.checksum:
                raise kv_failure(f"KV peer {peer}: control frame failed its integrity check", "integrity")
            return f, payload

        try:
            f, payload = await asyncio.wait_for(recv(), timeout)
        except TimeoutError:
            raise kv_failure(f"KV peer {peer} sent nothing for {timeout}s", "timeout") from None
        if f.ftype == ERROR and ERROR not in expect:
            raise_error_frame(payload, peer)
        if f.ftype not in expect:
            raise kv_failure(f"KV peer {peer} sent {FRAME_NAMES.get(f.ftype, f.ftype)}, expected "
                             f"{'/'.join(FRAME_NAMES.get(e, str(e)) for e in expect)}", "protocol")
        return f, payload

    async def _asend(self, loop, sock: socket.socket, parts, peer: str) -> None:
        async def send() -> None:
            for part in parts:
                await loop.sock_sendall(sock, part)

        try:
            await asyncio.wait_for(send(), self.io_timeout)
        except TimeoutError:
            raise kv_failure(f"sending to KV peer {peer} timed out after {self.io_timeout}s", "timeout") from None
        except OSError as exc:
            raise kv_failure(f"KV peer {peer} went away: {exc.strerror or exc}", "connection") from None

    async def _send_bulk(self, loop, sock: socket.socket, hdr: bytes, views, algo: int, peer: str) -> None:
        """Send one LAYER frame from a worker thread with blocking sends (no event-loop round trip per
        socket-buffer refill; nothing else touches the socket meanwhile)."""
        fut = loop.run_in_executor(self._send_pool, self._send_layer_blocking, sock, hdr, views, algo, peer)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the thread; the connection is dropped anyway
            await asyncio.wait([fut])
            raise

    def _send_layer_blocking(self, sock: socket.socket, hdr: bytes, views, algo: int, peer: str) -> None:
        """Header, payload chunk by chunk (each checksummed right before the kernel copies it, while it is
        in cache), then the payload checksum as an 8-byte trailer (absent with CK_NONE)."""
        h = hasher(algo)
        sock.settimeout(self.io_timeout)
        try:
            sock.sendall(hdr)
            for v in views:
                for off in range(0, len(v), CHUNK):
                    chunk = v[off:off + CHUNK]
                    if h is not None:
                        h.update(chunk)
                    sock.sendall(chunk)
            if h is not None:
                sock.sendall(TRAILER.pack(h.intdigest()))
        except TimeoutError:
            raise kv_failure(f"sending to KV peer {peer} timed out after {self.io_timeout}s", "timeout") from None
        except OSError as exc:
            raise kv_failure(f"KV peer {peer} went away: {exc.strerror or exc}", "connection") from None
        finally:
            sock.setblocking(False)

    async def _serve_conn(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            algo = await self._server_handshake(loop, sock, peer)
            while True:
                f, payload = await self._arecv_frame(loop, sock, peer, self.idle_timeout, self.server_frames)
                if f.ftype == RELEASE:
                    lease_id = str(json.loads(payload)["lease_id"])
                    if self._source is not None:
                        self._source.release(lease_id, completed=True)
                    await self._asend(loop, sock, [pack(OK, req=f.req)], peer)
                elif f.ftype == PULL:
                    await self._serve_pull(loop, sock, peer, f, payload, algo)
                elif not await self._serve_conn_frame(loop, sock, peer, f, payload, algo):
                    raise kv_failure(f"KV peer {peer} sent an unexpected frame {f.ftype}", "protocol")
        except asyncio.CancelledError:
            pass
        except KVTransferFailed as exc:
            lvl = logging.WARNING if failure_reason(exc) == "auth" else logging.DEBUG
            log.log(lvl, "KV connection from %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop.sock_sendall(sock, pack(ERROR, error_payload(exc))), 1.0)
        except Exception:
            log.exception("KV connection from %s failed", peer)
        finally:
            self._conn_socks.discard(sock)
            sock.close()

    async def _server_handshake(self, loop, sock: socket.socket, peer: str) -> int:
        t = self.connect_timeout
        _, hello = await self._arecv_frame(loop, sock, peer, t, (HELLO,))
        if len(hello) != NONCE_BYTES + 1:
            raise kv_failure(f"KV peer {peer}: malformed HELLO", "protocol")
        nonce_c, caps_c = hello[:NONCE_BYTES], hello[NONCE_BYTES]
        if caps_c & CAP_NOCHECK:  # the receiving side does not verify: do not compute it either
            algo = CK_NONE
        else:
            algo = CK_XXH3 if (caps_c & CAP_XXH3 and self.use_xxhash) else CK_CRC32
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        caps = (CAP_SECRET if self.secret else 0) | (CAP_XXH3 if algo == CK_XXH3 else 0) | \
            (CAP_NOCHECK if algo == CK_NONE else 0)
        proof = mac(self.secret, b"server", nonce_c, nonce_s) if self.secret else b""
        await self._asend(loop, sock, [pack(CHALLENGE, nonce_s + bytes([caps]) + proof)], peer)
        _, answer = await self._arecv_frame(loop, sock, peer, t, (AUTH,))
        if self.secret:
            if not hmac.compare_digest(answer, mac(self.secret, b"client", nonce_s, nonce_c)):
                raise kv_failure(f"refused KV peer {peer}: authentication failed (its BATON_KV_SECRET differs "
                                 "from this worker's, or it has none)", "auth")
        else:
            _warn_no_secret()
        await self._asend(loop, sock, [pack(AUTH_OK)], peer)
        return algo

    async def _serve_conn_frame(self, loop, sock, peer: str, f: Frame, payload: bytes, algo: int) -> bool:
        """A subclass's own request frame; False: not one."""
        return False

    def _read_layer(self, source: KVSource, lease, layer: int, dtype: torch.dtype, algo: int):
        k, v = source.read_layer(lease, layer)
        k = k.detach().to("cpu", dtype).contiguous()
        v = v.detach().to("cpu", dtype).contiguous()
        return (k, v), byte_view(k), byte_view(v)

    async def _serve_pull(self, loop, sock: socket.socket, peer: str, f: Frame, payload: bytes, algo: int) -> None:
        source = self._source
        if source is None:
            raise kv_failure("this worker serves no KV leases (not a prefill worker)", "lease")
        try:
            req = json.loads(payload)
            lease_id, n = str(req["lease_id"]), int(req["num_blocks"])
            theirs = KVLayout(**req["layout"])
        except (ValueError, KeyError, TypeError) as exc:
            raise kv_failure(f"malformed PULL request: {exc}", "protocol") from None
        layout = source.layout
        if theirs != layout:
            raise kv_failure(f"KV layout mismatch between prefill ({layout}) and decode ({theirs}) workers",
                             "layout")
        lease = source.acquire(lease_id)  # KVTransferFailed (unknown/expired) goes back as an ERROR frame
        completed = False
        nxt: asyncio.Future | None = None
        try:
            if len(lease.block_ids) != n:
                raise kv_failure(f"lease {lease_id} has {len(lease.block_ids)} blocks, the decode side "
                                 f"allocated {n}", "protocol")
            dtype, code = layout.torch_dtype, DTYPE_CODES[layout.dtype]

            async def read(layer: int):
                await source.wait_layer(lease_id, layer)
                return await loop.run_in_executor(self._read_pool, self._read_layer, source, lease, layer, dtype,
                                                  algo)

            nxt = asyncio.ensure_future(read(0))
            for layer in range(layout.num_layers):
                _keep, kv, vv = await nxt
                nxt = asyncio.ensure_future(read(layer + 1)) if layer + 1 < layout.num_layers else None
                hdr = HEADER.pack(MAGIC, VERSION, LAYER, code, algo, f.req, layer, n, layout.block_size,
                                  layout.num_kv_heads, layout.head_dim, kv.nbytes + vv.nbytes, 0)
                await self._send_bulk(loop, sock, hdr, (kv, vv), algo, peer)
                del _keep
            await self._arecv_frame(loop, sock, peer, self.io_timeout, (DONE,))
            completed = True
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
            source.release(lease_id, completed=completed)

    # -- client (decode side, one blocking thread per transfer) ----------------------------------------------
    async def pull(self, params: dict, sink: KVSink) -> TransferStats:
        loop = asyncio.get_running_loop()
        ctx = _PullCtx()
        t0 = time.perf_counter()
        fut = loop.run_in_executor(self._pull_pool, self._pull_blocking, params, sink, ctx)
        try:
            nbytes = await asyncio.shield(fut)
        except asyncio.CancelledError:
            ctx.abort()  # the thread stops at once; wait for it so nothing writes into freed blocks
            await asyncio.wait([fut])
            raise
        return TransferStats(num_bytes=nbytes, seconds=time.perf_counter() - t0,
                             num_layers=sink.layout.num_layers, transport=self.name)

    async def release(self, params: dict) -> None:
        host, port = params.get("remote_host"), params.get("remote_port")
        if not host or not port:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._pull_pool, self._release_blocking, str(host),
                                                             int(port), str(params.get("remote_request_id")))
        except KVTransferFailed as exc:
            log.debug("KV release at %s:%s failed: %s", host, port, exc)

    def _release_blocking(self, host: str, port: int, lease_id: str) -> None:
        conn = self._connect(host, port)
        try:
            self._send(conn, [pack(RELEASE, json.dumps({"lease_id": lease_id}).encode())], None)
            self._recv_frame(conn, (OK,), None)
        finally:
            conn.close()

    def _connect(self, host: str, port: int) -> _Conn:
        peer = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except TimeoutError:
            raise kv_failure(f"connecting to the prefill worker at {peer} timed out after "
                             f"{self.connect_timeout}s", "timeout") from None
        except OSError as exc:
            raise kv_failure(f"the prefill worker at {peer} is not reachable: {exc.strerror or exc}",
                             "connection") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, host, port, CK_CRC32)
        try:
            sock.settimeout(self.connect_timeout)
            conn.algo = self._client_handshake(conn)
            sock.settimeout(self.io_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _client_handshake(self, conn: _Conn) -> int:
        nonce_c = secrets.token_bytes(NONCE_BYTES)
        caps = (CAP_SECRET if self.secret else 0) | (CAP_XXH3 if self.checksum == "xxh3" else 0) | \
            (CAP_NOCHECK if self.checksum == "none" else 0)
        self._send(conn, [pack(HELLO, nonce_c + bytes([caps]))], None)
        _, ch = self._recv_frame(conn, (CHALLENGE,), None, phase="handshake")
        if len(ch) < NONCE_BYTES + 1:
            raise kv_failure(f"KV peer {conn.peer}: malformed CHALLENGE", "protocol")
        nonce_s, caps_s, proof = ch[:NONCE_BYTES], ch[NONCE_BYTES], ch[NONCE_BYTES + 1:]
        if self.secret and not caps_s & CAP_SECRET:
            raise kv_failure(f"KV authentication failed: the prefill worker at {conn.peer} has no BATON_KV_SECRET "
                             "but this worker has one; refusing an unauthenticated peer", "auth")
        if not self.secret and caps_s & CAP_SECRET:
            raise kv_failure(f"KV authentication failed: the prefill worker at {conn.peer} requires "
                             "BATON_KV_SECRET and this worker has none", "auth")
        if self.secret:
            if not hmac.compare_digest(proof, mac(self.secret, b"server", nonce_c, nonce_s)):
                raise kv_failure(f"KV authentication failed with the prefill worker at {conn.peer}: "
                                 "BATON_KV_SECRET differs between the prefill and decode workers", "auth")
            answer = mac(self.secret, b"client", nonce_s, nonce_c)
        else:
            _warn_no_secret()
            answer = b""
        self._send(conn, [pack(AUTH, answer)], None)
        self._recv_frame(conn, (AUTH_OK,), None, phase="handshake")
        if caps_s & CAP_NOCHECK and self.checksum == "none":
            return CK_NONE
        return CK_XXH3 if caps_s & CAP_XXH3 else CK_CRC32

    def _checkout(self, host: str, port: int) -> tuple[_Conn, bool]:
        now = time.monotonic()
        stale: list[_Conn] = []
        conn = None
        with self._idle_lock:
            lst = self._idle.get((host, port), [])
            while lst:
                c = lst.pop()
                if now - c.idle_since < self.idle_timeout / 2:
                    conn = c
                    break
                stale.append(c)
        for c in stale:
            c.close()
        if conn is not None:
            conn.sock.settimeout(self.io_timeout)
            return conn, True
        return self._connect(host, port), False

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._idle_lock:
            lst = self._idle.setdefault(conn.key, [])
            if len(lst) < self.max_idle_per_peer:
                lst.append(conn)
                return
        conn.close()

    def _send(self, conn: _Conn, parts, ctx: _PullCtx | None) -> None:
        try:
            for p in parts:
                conn.sock.sendall(p)
        except TimeoutError:
            raise kv_failure(f"sending to the prefill worker at {conn.peer} timed out", "timeout") from None
        except OSError as exc:
            if ctx is not None and ctx.aborted:
                raise kv_failure("KV transfer cancelled", "cancelled") from None
            raise kv_failure(f"the prefill worker at {conn.peer} went away: {exc.strerror or exc}",
                             "connection") from None

    def _recv_into(self, conn: _Conn, view: memoryview, ctx: _PullCtx | None, what: str, h=None) -> None:
        """Fill `view`; with a hasher `h`, checksum each chunk right after it arrived (while in cache)."""
        sock, got, n = conn.sock, 0, len(view)
        while got < n:
            try:
                r = sock.recv_into(view[got:], min(n - got, CHUNK))
            except TimeoutError:
                raise kv_failure(f"timed out after {self.io_timeout}s waiting for {what} from the prefill worker "
                                 f"at {conn.peer}", "timeout") from None
            except OSError as exc:
                if ctx is not None and ctx.aborted:
                    raise kv_failure("KV transfer cancelled", "cancelled") from None
                raise kv_failure(f"the connection to the prefill worker at {conn.peer} broke while receiving "
                                 f"{what}: {exc.strerror or exc}", "connection") from None
            if r == 0:
                if ctx is not None and ctx.aborted:
                    raise kv_failure("KV transfer cancelled", "cancelled")
                raise kv_failure(f"the prefill worker at {conn.peer} closed the connection while this worker was "
                                 f"receiving {what} (did it die?)", "connection")
            if h is not None:
                h.update(view[got:got + r])
            got += r

    def _recv_frame(self, conn: _Conn, expect: tuple[int, ...], ctx: _PullCtx | None,
                    phase: str = "a reply") -> tuple[Frame, bytes]:
        raw = bytearray(HEADER.size)
        self._recv_into(conn, memoryview(raw), ctx, phase)
        f = Frame.parse(raw, conn.peer)
        payload = b""
        if f.ftype != LAYER:
            if f.length > MAX_CONTROL_PAYLOAD:
                raise kv_failure(f"KV peer {conn.peer} sent an oversized control frame", "protocol")
            buf = bytearray(f.length)
            if f.length:
                self._recv_into(conn, memoryview(buf), ctx, phase)
            if zlib.crc32(buf) != f.checksum:
                raise kv_failure(f"KV peer {conn.peer}: control frame failed its integrity check", "integrity")
            payload = bytes(buf)
        if f.ftype == ERROR:
            raise_error_frame(payload, conn.peer)
        if f.ftype not in expect:
            raise kv_failure(f"KV peer {conn.peer} sent {FRAME_NAMES.get(f.ftype, f.ftype)}, expected "
                             f"{'/'.join(FRAME_NAMES.get(e, str(e)) for e in expect)}", "protocol")
        return f, payload

    def _pull_blocking(self, params: dict, sink: KVSink, ctx: _PullCtx) -> int:
        host, port = params.get("remote_host"), params.get("remote_port")
        if not host or not port:
            raise kv_failure("kv_transfer_params has no remote_host/remote_port (was the prefill worker "
                             "started with a TCP KV transport?)", "protocol")
        host, port = str(host), int(port)
        layout = sink.layout
        remote = layout_from_params(params) or layout
        if remote != layout:
            raise kv_failure(f"KV layout mismatch between prefill ({remote}) and decode ({layout}) workers",
                             "layout")
        rb = params.get("remote_block_ids")
        if rb is not None and len(rb) != len(sink.block_ids):
            raise kv_failure(f"the prefill worker holds {len(rb)} blocks, this worker allocated "
                             f"{len(sink.block_ids)}", "protocol")
        lease_id = str(params.get("remote_request_id"))
        for attempt in range(2):
            if ctx.aborted:
                raise kv_failure("KV transfer cancelled", "cancelled")
            if attempt == 0:
                conn, reused = self._checkout(host, port)
            else:  # the pooled connection was stale: so are its idle siblings (the peer restarted?)
                with self._idle_lock:
                    stale = self._idle.pop((host, port), [])
                for c in stale:
                    c.close()
                conn, reused = self._connect(host, port), False
            ctx.attach(conn.sock)
            ok = False
            try:
                nbytes = self._pull_on(conn, lease_id, sink, ctx, reused)
                ok = True
                return nbytes
            except _Stale:
                if attempt:
                    raise kv_failure(f"the prefill worker at {conn.peer} closed the connection", "connection") \
                        from None
            finally:
                if ok:
                    self._checkin(conn)
                else:
                    conn.close()
        raise AssertionError("unreachable")

    def _pull_on(self, conn: _Conn, lease_id: str, sink: KVSink, ctx: _PullCtx, reused: bool) -> int:
        layout = sink.layout
        n = len(sink.block_ids)
        L = layout.num_layers
        req = next(self._req_ids) & 0xFFFFFFFF
        body = json.dumps({"lease_id": lease_id, "num_blocks": n, "layout": layout.to_dict()}).encode()
        try:
            self._send(conn, [pack(PULL, body, req=req)], ctx)
            first, _ = self._recv_frame(conn, (LAYER,), ctx, f"layer 0/{L}")
        except KVTransferFailed as exc:
            if reused and failure_reason(exc) == "connection":
                raise _Stale() from None
            raise
        nbytes_layer = layout.layer_nbytes(n)
        shape = (2, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
        direct = getattr(sink, "direct_layer", None)
        staging: list[torch.Tensor | None] = [None, None]
        pending: list[concurrent.futures.Future | None] = [None, None]
        checks: list[concurrent.futures.Future] = []
        algo = conn.algo
        total = 0
        f = first
        try:
            for layer in range(L):
                what = f"layer {layer}/{L}"
                if layer:
                    f, _ = self._recv_frame(conn, (LAYER,), ctx, what)
                if (f.layer, f.nblocks, f.block_size, f.heads, f.head_dim) != \
                        (layer, n, layout.block_size, layout.num_kv_heads, layout.head_dim) \
                        or f.dtype != DTYPE_CODES[layout.dtype] or f.length != nbytes_layer or f.req != req:
                    raise kv_failure(f"KV peer {conn.peer} sent an unexpected frame for {what} (layer {f.layer}, "
                                     f"{f.nblocks} blocks, {f.length} bytes)", "protocol")
                views = direct(layer) if direct is not None else None
                h = hasher(algo)
                if views is not None:  # straight into the cache
                    k, v = views
                    for t in (byte_view(k), byte_view(v)):
                        self._recv_into(conn, t, ctx, what, h)
                    self._check_trailer(conn, ctx, layer, h)
                    self._layer_done(layer)
                else:
                    slot = layer & 1
                    if pending[slot] is not None:
                        pending[slot].result()  # its staging buffer is free again
                    if staging[slot] is None:
                        staging[slot] = torch.empty(shape, dtype=layout.torch_dtype)
                    buf = staging[slot]
                    self._recv_into(conn, byte_view(buf), ctx, what, h)
                    self._check_trailer(conn, ctx, layer, h)
                    pending[slot] = self._write_pool.submit(self._write, sink, layer, buf)
                    checks.append(pending[slot])
                total += f.length
            for c in checks:
                c.result()
        finally:  # never return (and let the engine free the blocks) while a write is still in flight
            concurrent.futures.wait(checks)
        self._send(conn, [pack(DONE, b'{"ok":true}', req=req)], ctx)
        return total

    def _check_trailer(self, conn: _Conn, ctx: _PullCtx, layer: int, h) -> None:
        if h is None:
            return
        raw = bytearray(TRAILER.size)
        self._recv_into(conn, memoryview(raw), ctx, f"the checksum of layer {layer}")
        if TRAILER.unpack(raw)[0] != h.intdigest():
            raise kv_failure(f"KV payload integrity check failed for layer {layer} (checksum mismatch): the data "
                             "was corrupted in transit", "integrity")

    def _write(self, sink: KVSink, layer: int, buf: torch.Tensor) -> None:
        sink.write_layer(layer, buf[0], buf[1])
        self._layer_done(layer)

    def _verify(self, layer: int, views, expected: int, algo: int, sink: KVSink | None,
                buf: torch.Tensor | None) -> None:
        """(NIXL) check a payload that is already in place, then write it into the sink."""
        if algo != CK_NONE and checksum(algo, views) != expected:
            raise kv_failure(f"KV payload integrity check failed for layer {layer} (checksum mismatch): the data "
                             "was corrupted in transit", "integrity")
        if sink is not None:
            sink.write_layer(layer, buf[0], buf[1])
        self._layer_done(layer)

    def _layer_done(self, layer: int) -> None:
        cb = self.on_layer_received
        if cb is not None:
            cb(layer, time.monotonic())
