"""`BatonEngine`: the asyncio face of the engine (implements `types.Engine`).

An engine loop task drives `EngineCore.step()` in a dedicated thread (the event loop stays responsive while
the forward runs); outputs go to one asyncio queue per request. Roles:

- `both`: ordinary serving. Requests carrying `kv_transfer_params` are still honoured (prefill hop with
  `do_remote_decode`, decode hop with `do_remote_prefill`), like vLLM's `kv_both`.
- `prefill`: every request is a prefill hop: run the prompt, sample the first token, finish, and keep the KV
  blocks under a lease for the decode worker (`kv_transfer_params` on the final output).
- `decode`: requests with `do_remote_prefill` import the KV through the transport, emit the first token
  first, then decode on; requests without it are served normally (local prefill).

    engine = BatonEngine.from_pretrained("/models/tiny", role="both")  # or: await ...
    await engine.start()
    async for out in engine.generate(GenerationRequest("r1", ids, SamplingParams(max_tokens=8))): ...
    await engine.stop()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Self

import torch

from baton import __version__ as baton_version

from ..kv.base import FAILURE_REASONS, KVLayout, KVTransport, TransferHistogram, failure_reason
from ..kv.params_auth import ParamsAuth
from . import fingerprint
from .config import ModelLoadError, load_model_config
from .core import EngineCore, LayerProgress, new_engine_id
from .kv_cache import PagedKVCache
from .model import LlamaModel
from .sequence import Mode, Sequence
from .tokenizer import HFTokenizer, IncrementalDetokenizer
from .types import (
    EngineError,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    InvalidRequest,
    KVTransferFailed,
    Role,
    StepOutput,
)
from .weights import load_weights

log = logging.getLogger("baton.worker.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """The CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16): bf16 matmuls then run at about twice
    fp32's speed and the weights and KV cache take half the memory. Without it torch emulates bf16, slower
    than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_dtype(dtype: str | torch.dtype, checkpoint: str | None = None) -> torch.dtype:
    """Names -> torch dtypes. `auto`: bfloat16 when the checkpoint is 16-bit (bfloat16/float16: nearly every
    published model) and the CPU computes bf16 natively; float32 otherwise -- a float32 checkpoint (Baton's
    tiny test models) stays float32, so its outputs do not depend on the machine it runs on."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        half = checkpoint in ("bfloat16", "float16")
        return torch.bfloat16 if half and cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]
DEFAULT_KV_CACHE_BYTES = 1 << 30
#: The chunked-prefill step budget (tokens): small enough that a step with a prompt chunk stays within a few
#: decode steps' time on a CPU, large enough that prompts still go through in a handful of steps.
DEFAULT_CHUNKED_BUDGET = 512


class _Sink:
    """KVSink for one decode-hop request: writes into the engine's own blocks."""

    def __init__(self, core: EngineCore, block_ids: list[int]) -> None:
        self.layout: KVLayout = core.layout
        self.block_ids = block_ids
        self._core = core

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._core.write_layer(self.block_ids, layer, k, v)

    def direct_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the destination blocks in `layer` when they are one ascending run (receive in place)."""
        ids = self.block_ids
        if not ids or ids[-1] - ids[0] != len(ids) - 1 or any(b - a != 1 for a, b in itertools.pairwise(ids)):
            return None
        k, v = self._core.cache.layers[layer]
        return k[ids[0]:ids[-1] + 1], v[ids[0]:ids[-1] + 1]


class BatonEngine:
    """The Baton engine. See the module docstring; all arguments after `tokenizer` are keyword-only.

    - role: "both" | "prefill" | "decode"
    - max_model_len: prompt + generated tokens limit (default: the model's max_position_embeddings)
    - block_size: tokens per KV block (16)
    - num_kv_blocks: size of the KV cache in blocks (default: from kv_cache_bytes, capped at what
      max_num_seqs full-length sequences need)
    - kv_cache_bytes: memory for the KV cache when num_kv_blocks is not given (1 GiB)
    - max_num_seqs: sequences decoded together (64)
    - enable_chunked_prefill: token-budget steps mixing decodes and prompt chunks (Sarathi-Serve; see
      scheduler.py). Default: on for `both` and `decode` (they have decodes a long prompt would stall), off
      for `prefill` (whole prompts batch best and nothing decodes there)
    - max_num_batched_tokens: tokens per step: with chunked prefill the step budget (decode rows + prompt
      chunks; default 512, at least max_num_seqs); without, prompt tokens per prefill step (at least one
      whole prompt: max_model_len, and 2048)
    - enable_prefix_caching: share the KV of full blocks of prompt prefixes seen before (True)
    - max_waiting: queued requests beyond which `generate` raises EngineOverloaded (256)
    - kv_transport: a `KVTransport` (default: the in-process one for prefill/decode roles)
    - kv_lease_seconds: how long a prefill worker keeps KV for the decode worker (30)
    - kv_params_auth: signs and checks kv_transfer_params (default: with the KV transport's secret; none for
      the in-process transport), see `kv/params_auth.py`
    - on_kv_transfer: callback(seconds, bytes) per completed import (for baton_kv_transfer_* metrics)
    - overlap_steps: start the next step before handing out this step's outputs to the streams (True)
    - model_identity: the model's identity in the KV-layout fingerprint (`fingerprint.model_identity` of its
      folder; `from_pretrained` passes it; default: a digest of the parsed config)
    """

    def __init__(self, model: LlamaModel, tokenizer: HFTokenizer, *, role: Role = "both",
                 model_name: str = "model", max_model_len: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_bytes: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int | None = None, max_waiting: int = 256,
                 kv_transport: KVTransport | None = None, kv_lease_seconds: float = 30.0,
                 engine_id: str | None = None, seed: int | None = None,
                 on_kv_transfer: Callable[[float, int], None] | None = None, overlap_steps: bool = True,
                 enable_chunked_prefill: bool | None = None, enable_prefix_caching: bool = True,
                 model_identity: str | None = None, kv_params_auth: ParamsAuth | None = None) -> None:
        if role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, not {role!r}")
        cfg = model.cfg
        self.role: Role = role
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, model.max_len)
        self.block_size = block_size
        if num_kv_blocks is None:
            per_block = PagedKVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                                                     model.dtype)
            by_memory = (kv_cache_bytes or DEFAULT_KV_CACHE_BYTES) // per_block
            needed = max_num_seqs * -(-self.max_model_len // block_size)
            num_kv_blocks = int(max(1, min(by_memory, needed)))
        self.max_model_len = min(self.max_model_len, num_kv_blocks * block_size)  # one sequence must always fit
        self.max_num_seqs = max_num_seqs
        self.chunked_prefill = role != "prefill" if enable_chunked_prefill is None else enable_chunked_prefill
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, not {max_num_batched_tokens}")
        if self.chunked_prefill:  # every running sequence's decode row must fit in a step
            self.max_num_batched_tokens = max(max_num_batched_tokens or DEFAULT_CHUNKED_BUDGET, max_num_seqs)
        else:  # a whole prompt must fit in one step
            self.max_num_batched_tokens = max(max_num_batched_tokens or 0, self.max_model_len, 2048)
        self.prefix_caching = enable_prefix_caching
        self.max_waiting = max_waiting
        self.engine_id = engine_id or new_engine_id()
        if kv_transport is None and role != "both":
            from ..kv.inprocess import InProcessKVTransport

            kv_transport = InProcessKVTransport()
        self.kv_transport = kv_transport
        # the transport's own secret (env BATON_KV_SECRET): one key for the handshake and the params' signature
        self.kv_params_auth = kv_params_auth or ParamsAuth(getattr(kv_transport, "secret", None))
        self.on_kv_transfer = on_kv_transfer
        self.overlap_steps = overlap_steps
        self.core = EngineCore(
            model, role=role, engine_id=self.engine_id, max_model_len=self.max_model_len, block_size=block_size,
            num_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, lease_seconds=kv_lease_seconds, seed=seed,
            kv_address=kv_transport.address() if kv_transport else ("", 0),
            chunked_prefill=self.chunked_prefill, prefix_caching=enable_prefix_caching,
            params_auth=self.kv_params_auth,
        )
        self.eos_token_ids = tuple(dict.fromkeys((*tokenizer.eos_token_ids, *cfg.eos_token_ids)))
        # what a peer's KV must match to be used here (the router pairs prefill and decode workers by it)
        self.kv_layout = fingerprint.KVLayout(
            engine="baton", engine_version=baton_version, model=model_identity or fingerprint.config_identity(cfg),
            dtype=fingerprint.dtype_name(model.dtype), block_size=block_size, tensor_parallel=1,
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
        self.kv_fingerprint = fingerprint.fingerprint(self.kv_layout)
        self._streams: dict[str, asyncio.Queue] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._import_tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.kv_transfers_total = 0
        self.kv_transfer_bytes_total = 0
        self.kv_transfer_seconds_total = 0.0
        self.kv_transfer_seconds = TransferHistogram()
        self.kv_transfer_failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.loop_error: BaseException | None = None

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | torch.dtype = "float32",
                        model_name: str | None = None, gemm_kind: str | None = None, **kwargs) -> BatonEngine:
        """Load config, weights and tokenizer from a Hugging Face model directory; `gemm_kind` picks the
        projections' GEMM (`gemm.choose`: default by dtype and $BATON_CPU_GEMM); other keyword arguments go to
        the constructor. Synchronous; `await BatonEngine.from_pretrained(...)` works too (an engine is
        awaitable and returns itself), and `from_pretrained_async` loads in a worker thread."""
        path = Path(path)
        cfg = load_model_config(path)
        dtype = resolve_dtype(dtype, cfg.checkpoint_dtype)
        log.info("loading %s in %s", path, str(dtype).removeprefix("torch."))
        model = LlamaModel(cfg, load_weights(path, cfg, dtype), dtype=dtype, max_len=kwargs.get("max_model_len"),
                           gemm_kind=gemm_kind)
        tokenizer = HFTokenizer(path)
        kwargs.setdefault("model_identity", fingerprint.model_identity(path))
        return cls(model, tokenizer, model_name=model_name or path.name, **kwargs)

    load = from_pretrained

    @classmethod
    async def from_pretrained_async(cls, path: str | Path, **kwargs) -> BatonEngine:
        return await asyncio.to_thread(cls.from_pretrained, path, **kwargs)

    def __await__(self):
        async def itself() -> BatonEngine:
            return self

        return itself().__await__()

    def on_kv_exported(self, callback: Callable[[str, float, float], None] | None) -> None:
        """Have `callback(lease_id, pull started, pull done)` (time.monotonic()) called when a transport has
        shipped a lease, from the transport's thread: the HTTP server's `kv_export` trace spans."""
        self.core.leases.on_exported = callback

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-engine")
        self.core.leases._on_release = self._wake_threadsafe
        self.core.progress = LayerProgress(self._loop)
        self.core.emit = self._emit_threadsafe
        if self.kv_transport is not None:
            await self.kv_transport.start(self.core if self.role in ("prefill", "both") else None)
        self._loop_task = asyncio.create_task(self._run(), name=f"baton-engine-{self.engine_id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._loop_task is not None:
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
            self._loop_task = None
        for task in list(self._import_tasks):
            task.cancel()
        for rid, q in list(self._streams.items()):
            q.put_nowait(EngineError("engine stopped"))
        if self.kv_transport is not None:
            await self.kv_transport.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.core.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _emit_threadsafe(self, out: StepOutput) -> None:
        """Engine thread: hand one output to its stream now (not at the end of the step)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver_one, out)

    def _deliver_one(self, out: StepOutput) -> None:
        q = self._streams.get(out.request_id)
        if q is not None:
            q.put_nowait(out)

    def _wake_threadsafe(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                wake.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(wake.set)

    # -- requests -------------------------------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> Mode:
        p = request.sampling
        ids = request.prompt_token_ids
        if not request.request_id:
            raise InvalidRequest("request_id must not be empty", param="request_id")
        if request.request_id in self._streams:
            raise InvalidRequest(f"request {request.request_id!r} is already running", param="request_id")
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if p.max_tokens is None or p.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if p.temperature < 0 or p.temperature != p.temperature:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if p.top_k < 0 and p.top_k != -1:
            raise InvalidRequest("top_k must be >= 0 (0 or -1 disables it)", param="top_k")
        if any(t < 0 or t >= vocab for t in p.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model's context length is {self.max_model_len}",
                param="prompt")
        if len(ids) + p.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the context length "
                f"{self.max_model_len}", param="max_tokens")
        kv = request.kv_transfer_params or {}
        if self.role == "prefill" or kv.get("do_remote_decode"):
            return Mode.PREFILL_HOP
        if kv.get("do_remote_prefill"):
            if self.kv_transport is None:
                raise InvalidRequest("this worker has no KV transport for do_remote_prefill",
                                     param="kv_transfer_params")
            self.kv_params_auth.verify(kv)  # KVParamsRejected: before anything connects to the named peer
            first = kv.get("first_token_ids")  # absent: announced early; this worker computes the first token
            if first is not None and (not first or not all(isinstance(t, int) and 0 <= t < vocab for t in first)):
                raise InvalidRequest("kv_transfer_params.first_token_ids must hold the first token",
                                     param="kv_transfer_params")
            n = kv.get("num_prompt_tokens")
            if n is not None and int(n) != len(ids):
                raise InvalidRequest(f"kv_transfer_params.num_prompt_tokens ({n}) != prompt length ({len(ids)})",
                                     param="kv_transfer_params")
            if kv.get("remote_block_ids") is not None and \
                    len(kv["remote_block_ids"]) != -(-len(ids) // self.block_size):
                raise KVTransferFailed("the prefill worker's block list does not match this worker's block size")
            return Mode.IMPORT
        return Mode.NORMAL

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Stream `StepOutput`s. InvalidRequest / EngineOverloaded / KVTransferFailed are raised before the
        first output; closing the iterator early aborts the request and frees its KV blocks."""
        if self._loop_task is None:
            await self.start()
        if self.loop_error is not None:
            raise EngineError(f"engine loop failed: {self.loop_error}")
        mode = self._validate(request)
        if len(self.core.scheduler.waiting) + len(self.core.incoming) >= self.max_waiting:
            raise EngineOverloaded(f"{self.max_waiting} requests are already waiting")
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        seq = Sequence(request, mode, detok, self.eos_token_ids, self.max_model_len)
        queue: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        self._streams[rid] = queue
        self.core.incoming.append(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.core.aborts.append(rid)
                if self._wake is not None:
                    self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.core.aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    def stats(self) -> EngineStats:
        s = self.core.stats()
        s.kv_transfers_total = self.kv_transfers_total
        s.kv_transfer_bytes_total = self.kv_transfer_bytes_total
        s.kv_transfer_seconds_total = self.kv_transfer_seconds_total
        s.kv_transport = self.kv_transport.transport if self.kv_transport else None
        s.kv_transfer_seconds_buckets = self.kv_transfer_seconds.cumulative()
        s.kv_transfer_failures = dict(self.kv_transfer_failures)
        s.kv_params_rejected = dict(self.kv_params_auth.rejected)
        return s

    # -- the loop -------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        pending: asyncio.Future | None = None
        try:
            while not self._stopping:
                if pending is None:
                    self._wake.clear()
                    if not core.has_work():
                        await self._sleep(self._idle_timeout())
                        if self._stopping:
                            break
                    pending = loop.run_in_executor(self._executor, self._steps if self.overlap_steps else core.step)
                res = await pending
                pending = None
                self._deliver(res)
                if pending is None and not res.ran_forward and not res.outputs:
                    # nothing runnable (waiting for blocks held by leases/imports): sleep until something changes
                    await self._sleep(self._idle_timeout(0.05))
            if pending is not None:
                self._deliver(await pending)
        except Exception as exc:  # never leave callers hanging
            log.exception("engine loop failed")
            self.loop_error = exc
            for q in self._streams.values():
                q.put_nowait(EngineError(f"engine loop failed: {exc}"))

    def _steps(self):
        """Engine thread, overlap_steps: run steps back to back while there is work, handing each step's
        outputs to the event loop as it goes (the next step computes while the loop delivers them, and the
        thread never waits for the loop); the last step's result is returned for `_run` to deliver."""
        core, loop, deliver = self.core, self._loop, self._deliver
        res = core.step()
        while (res.ran_forward or res.outputs) and not self._stopping and core.has_work():
            loop.call_soon_threadsafe(deliver, res)
            res = core.step()
        return res

    def _deliver(self, res) -> None:
        streams = self._streams
        for out in res.outputs:
            q = streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        for rid, err in res.failures:
            q = streams.get(rid)
            if q is not None:
                q.put_nowait(err if isinstance(err, EngineError) else KVTransferFailed(str(err)))
        for seq in res.start_imports:
            task = asyncio.create_task(self._import(seq))
            self._import_tasks.add(task)
            task.add_done_callback(self._import_tasks.discard)

    def _idle_timeout(self, default: float | None = None) -> float | None:
        expiry = self.core.next_lease_expiry()
        if expiry is None:
            return default
        wait = max(0.001, expiry - time.monotonic() + 0.001)
        return wait if default is None else min(wait, default)

    async def _sleep(self, timeout: float | None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _import(self, seq: Sequence) -> None:
        err: Exception | None = None
        try:
            stats = await self.kv_transport.pull(seq.kv_params or {}, _Sink(self.core, seq.block_ids))
            self.kv_transfers_total += 1
            self.kv_transfer_bytes_total += stats.num_bytes
            self.kv_transfer_seconds_total += stats.seconds
            self.kv_transfer_seconds.observe(stats.seconds)
            if self.on_kv_transfer is not None:
                self.on_kv_transfer(stats.seconds, stats.num_bytes)
        except asyncio.CancelledError:
            err = KVTransferFailed("KV import cancelled (engine stopping)")
            raise
        except KVTransferFailed as exc:
            err = exc
        except Exception as exc:  # a transport bug must not kill the engine
            log.exception("KV import failed")
            err = KVTransferFailed(f"KV import failed: {exc}")
        finally:
            if err is not None:
                reason = failure_reason(err)
                self.kv_transfer_failures[reason] = self.kv_transfer_failures.get(reason, 0) + 1
            self.core.imports_done.append((seq, err))
            if self._wake is not None:
                self._wake.set()

