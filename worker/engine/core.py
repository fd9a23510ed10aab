"""The synchronous engine core: owns the model, KV cache, scheduler and leases; `step()` runs in one thread.

The asyncio side (`engine.BatonEngine`) never touches this state directly: it hands requests, aborts and
finished KV imports over through thread-safe deques, and `step()` drains them first.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from baton.launch import KV_ANNOUNCE

from ..kv.base import KVLayout, KVLease
from .batch import build_step
from .kv_cache import PagedKVCache
from .leases import LeaseTable
from .model import LlamaModel
from .sampling import Sampler, advance_generator
from .scheduler import ScheduledStep, Scheduler
from .sequence import Mode, Sequence, Status
from .types import EngineStats, StepOutput

if TYPE_CHECKING:
    from ..kv.params_auth import ParamsAuth


class LayerProgress:
    """Wakes the coroutines waiting for KV layers (`EngineCore.wait_layer`) from the engine thread: `notify`
    after every layer written resolves the future they wait on and arms a new one (loop thread only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next: asyncio.Future = loop.create_future()

    def notify(self) -> None:
        """Any thread."""
        try:
            self._loop.call_soon_threadsafe(self._tick)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    def _tick(self) -> None:
        fut, self._next = self._next, self._loop.create_future()
        if not fut.done():
            fut.set_result(None)

    async def wait_next(self) -> None:
        await asyncio.shield(self._next)


@dataclass
class StepResult:
    outputs: list[StepOutput] = field(default_factory=list)
    failures: list[tuple[str, Exception]] = field(default_factory=list)  # request_id, error for its stream
    start_imports: list[Sequence] = field(default_factory=list)
    ran_forward: bool = False


class EngineCore:
    def __init__(self, model: LlamaModel, *, role: str, engine_id: str, max_model_len: int, block_size: int,
                 num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int, lease_seconds: float,
                 seed: int | None = None, kv_address: tuple[str, int] = ("", 0), chunked_prefill: bool = False,
                 prefix_caching: bool = True, params_auth: ParamsAuth | None = None) -> None:
        cfg = model.cfg
        self.model = model
        self.role = role
        self.engine_id = engine_id
        self.max_model_len = max_model_len
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  model.dtype, prefix_caching=prefix_caching)
        self.layout = KVLayout(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                               str(model.dtype).removeprefix("torch."))
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, chunked=chunked_prefill)
        self.sampler = Sampler(seed)
        self.leases = LeaseTable(lease_seconds)
        self.kv_address = kv_address
        self.params_auth = params_auth  # signs the kv_transfer_params this worker hands out (kv/params_auth.py)
        # handed over from the event loop (deque append/popleft are thread-safe)
        self.incoming: deque[Sequence] = deque()
        self.aborts: deque[str] = deque()
        self.imports_done: deque[tuple[Sequence, Exception | None]] = deque()
        # counters
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.busy_seconds_total = 0.0  # forward steps: the autoscaler's busy share and prefill capacity
        self.layers_ready: dict[str, int] = {}  # lease -> layers written, while its final prefill step runs
        self.progress: LayerProgress | None = None  # set by the asyncio side: wakes wait_layer
        self.emit: Callable[[StepOutput], None] | None = None  # set by the asyncio side: an output, right now

    # -- KVSource (export side; called by transports from any thread) -----------------------------------------
    def acquire(self, lease_id: str) -> KVLease:
        return self.leases.acquire(lease_id)

    async def wait_layer(self, lease_id: str, layer: int) -> None:
        """Return once `layer` of the lease's KV is written. A lease is created when the step that computes the
        end of its prompt starts (layer-wise export): its layers become readable one by one while that forward
        runs, and a transport ships layer i while later layers compute."""
        while True:
            done = self.layers_ready.get(lease_id)
            if done is None or done > layer:
                return
            if self.progress is None:  # no event loop to wake us (tests driving step() by hand)
                await asyncio.sleep(0.001)
            else:
                await self.progress.wait_next()

    def read_layer(self, lease: KVLease, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read_blocks(layer, lease.block_ids)

    def release(self, lease_id: str, completed: bool = True) -> None:
        self.leases.release(lease_id, completed)

    # -- state ------------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.incoming or self.aborts or self.imports_done or self.scheduler.has_work()
                    or self.leases.has_released())

    def stats(self) -> EngineStats:
        alloc = self.cache.allocator
        return EngineStats(
            num_running=len(self.scheduler.running) + len(self.scheduler.prefilling) + len(self.scheduler.importing),
            num_waiting=len(self.scheduler.waiting) + len(self.incoming),
            kv_cache_usage=alloc.num_used / alloc.num_blocks,
            num_blocks_total=alloc.num_blocks,
            num_blocks_free=alloc.num_free,
            num_kv_leases=len(self.leases),
            kv_leases_pulled_total=self.leases.released_total,
            kv_leases_expired_total=self.leases.expired_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions,
            busy_seconds_total=self.busy_seconds_total,
            prefix_cache_queries_total=self.scheduler.prefix_queries,
            prefix_cache_hits_total=self.scheduler.prefix_hits,
        )

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        res = StepResult()
        sched = self.scheduler
        while self.incoming:
            sched.add(self.incoming.popleft())
        while self.aborts:
            self._abort(self.aborts.popleft(), res)
        while self.imports_done:
            seq, err = self.imports_done.popleft()
            self._finish_import(seq, err, res)
        for blocks in self.leases.collect():
            self.cache.allocator.free(blocks)

        plan = sched.schedule()
        res.start_imports = plan.start_imports
        if plan.prefill or plan.decode:
            started = time.perf_counter()
            try:
                self._run(plan, res)
            finally:
                self.busy_seconds_total += time.perf_counter() - started
        return res

    def _run(self, plan: ScheduledStep, res: StepResult) -> None:
        """One forward over the step's decode rows and prompt chunks, then the new tokens."""
        decode, chunks = plan.decode, plan.prefill
        bs = self.cache.block_size
        fb = build_step([(s.output_ids[-1], s.num_tokens, s.block_ids) for s in decode],
                        [(c.tokens, c.start, c.seq.block_ids) for c in chunks], bs, self.model.dtype)
        early = [c.seq for c in chunks if c.completes and c.seq.mode is Mode.PREFILL_HOP]
        on_layer = None
        if early:  # layer-wise export: lease (and announce) now, mark layers as the forward writes them
            streaming = [self._open_lease(seq, res) for seq in early]
            ready, progress = self.layers_ready, self.progress

            def on_layer(i: int) -> None:
                for lid in streaming:
                    ready[lid] = i + 1
                if progress is not None:
                    progress.notify()
        try:
            logits = self.model.forward(fb, self.cache.layers, on_layer=on_layer)
        finally:
            if early:
                for lid in streaming:
                    self.layers_ready.pop(lid, None)
                if self.progress is not None:
                    self.progress.notify()
        res.ran_forward = True
        sched = self.scheduler
        for c in chunks:
            c.seq.num_computed += len(c.tokens)
            sched.register_computed(c.seq)
        done = [c.seq for c in chunks if c.completes]
        seqs = decode + done
        if not seqs:  # prompt chunks only, none finished
            return
        rows = logits
        if len(done) < len(chunks):  # rows of chunks that did not reach their prompt's end give no token
            keep = list(range(len(decode))) + [len(decode) + i for i, c in enumerate(chunks) if c.completes]
            rows = logits[keep]
        if all(s.greedy for s in seqs):
            next_tokens = rows.argmax(dim=-1).tolist()
        else:
            next_tokens = self.sampler.sample_sequences(rows, seqs)
        outputs = res.outputs
        nd = len(decode)
        for seq, tok in zip(decode, next_tokens[:nd]):
            seq.num_computed += 1
            if seq.num_computed % bs == 0:
                sched.register_computed(seq)
            out = seq.append_token(tok)
            self.generation_tokens_total += 1
            if out.finished:
                sched.remove(seq)
            outputs.append(out)
        for seq, tok in zip(done, next_tokens[nd:]):
            if not seq.output_ids:  # first time (not a recompute after preemption)
                self.prompt_tokens_total += len(seq.prompt_ids)
            out = seq.append_token(tok)
            self.generation_tokens_total += 1
            if out.finished:
                hop = seq.mode is Mode.PREFILL_HOP  # its blocks now belong to the lease
                if hop:
                    out.kv_transfer_params = self._lease_params(seq)
                sched.remove(seq, free_blocks=not hop)
                seq.block_ids = []
            else:
                sched.prefill_done(seq)
            outputs.append(out)

    def _open_lease(self, seq: Sequence, res: StepResult) -> str:
        """Lease `seq`'s blocks before the forward that writes the end of its prompt (layer-wise export). A prefill
        hop that asked for it (`KV_ANNOUNCE` in its kv_transfer_params) gets the transfer parameters at once, in
        an output of its own without a token, so the decode hop can start pulling while this forward runs; the
        first token then comes from the decode worker, which computes the prompt's last position itself."""
        lease_id = new_lease_id()
        self.leases.create(lease_id, seq.block_ids, len(seq.prompt_ids))
        self.layers_ready[lease_id] = 0
        seq.lease_id = lease_id
        seq.lease_expires = time.time() + self.leases.ttl
        if (seq.kv_params or {}).get(KV_ANNOUNCE):
            params = self._lease_params(seq, announce=True)
            out = StepOutput(seq.request_id, [], "", False, None, len(seq.prompt_ids), 0, kv_transfer_params=params)
            if self.emit is not None:  # now, not after this step: the point is to start before the forward ends
                self.emit(out)
            else:
                res.outputs.append(out)
        return lease_id

    def _lease_params(self, seq: Sequence, announce: bool = False) -> dict:
        """`kv_transfer_params` of a prefill hop (vLLM's protocol): where the decode hop pulls its KV (the lease
        `_open_lease` made when the step that ends the prompt started). An announcement (`announce`) has no first
        token yet. Signed, with the lease's end as expiry, so a decode worker pulls only from here, only this
        lease, only while it lasts (`kv/params_auth.py`)."""
        lease_id = seq.lease_id
        host, port = self.kv_address
        params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_request_id": lease_id,
            "remote_block_ids": list(seq.block_ids),
            "remote_host": host,
            "remote_port": port,
            "first_token_ids": list(seq.output_ids[:1]),
            "num_prompt_tokens": len(seq.prompt_ids),
            "kv_layout": self.layout.to_dict(),
            "lease_seconds": self.leases.ttl,
        }
        if announce:
            del params["first_token_ids"]
        return self.params_auth.sign(params, seq.lease_expires) if self.params_auth is not None else params

    def _abort(self, request_id: str, res: StepResult) -> None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return
        seq.aborted = True
        if seq.status is Status.IMPORTING:
            # the transfer may still be writing into its blocks: free them when the import task reports back
            res.outputs.append(seq.abort_output())
            return
        self.scheduler.remove(seq)
        res.outputs.append(seq.abort_output())

    def _finish_import(self, seq: Sequence, err: Exception | None, res: StepResult) -> None:
        if seq.aborted:
            self.scheduler.remove(seq)
            return
        if err is not None:
            self.scheduler.remove(seq)
            res.failures.append((seq.request_id, err))
            return
        params = seq.kv_params or {}
        if not params.get("first_token_ids"):  # announced before the prefill ended (layer-wise export): the
            seq.num_computed = len(seq.prompt_ids) - 1  # prompt's last position is computed here for its logits
            self.scheduler.import_done(seq, last_position=True)
            return
        first = int(params["first_token_ids"][0])
        self.prompt_tokens_total += len(seq.prompt_ids)
        if seq.generator is not None:  # the prefill worker drew the first token from the same seed
            advance_generator(seq.generator, self.model.cfg.vocab_size)
        seq.num_computed = len(seq.prompt_ids)
        out = seq.append_token(first)
        self.generation_tokens_total += 1
        res.outputs.append(out)
        if out.finished:
            self.scheduler.remove(seq)
        else:
            self.scheduler.import_done(seq)

    def write_layer(self, block_ids: list[int], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write_blocks(layer, block_ids, k, v)

    def next_lease_expiry(self) -> float | None:
        return self.leases.next_expiry()

    def shutdown(self) -> None:
        for blocks in self.leases.drain():
            self.cache.allocator.free(blocks)


def new_engine_id() -> str:
    return uuid.uuid4().hex[:12]


def new_lease_id() -> str:
    """A fresh KV lease id (`kv_transfer_params["remote_request_id"]`): 128 random bits from `secrets`.

    Why not the request id: that comes from the client's X-Request-Id header, so a lease named after it
    (plus a counter) could be guessed, and pulled or released, by anyone who knows or chooses the header. The
    request id stays what the logs and responses carry; the lease id is only ever learnt from the prefill
    response, which goes to the router alone.
    """
    return secrets.token_urlsafe(16)


def now() -> float:
    return time.monotonic()
