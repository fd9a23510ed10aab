"""The synchronous engine core: owns the model, KV cache, scheduler and leases; `step()` runs in one thread.

The asyncio side (`engine.BatonEngine`) never touches this state directly: it hands requests, aborts and
finished KV imports over through thread-safe deques, and `step()` drains them first.
"""
from __future__ import annotations

import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from ..kv.base import KVLayout, KVLease
from .batch import build_decode, build_prefill
from .kv_cache import PagedKVCache
from .leases import LeaseTable
from .model import LlamaModel
from .sampling import Sampler, advance_generator
from .scheduler import Scheduler
from .sequence import Mode, Sequence, Status
from .types import EngineStats, StepOutput


@dataclass
class StepResult:
    outputs: list[StepOutput] = field(default_factory=list)
    failures: list[tuple[str, Exception]] = field(default_factory=list)  # request_id, error for its stream
    start_imports: list[Sequence] = field(default_factory=list)
    ran_forward: bool = False


class EngineCore:
    def __init__(self, model: LlamaModel, *, role: str, engine_id: str, max_model_len: int, block_size: int,
                 num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int, lease_seconds: float,
                 seed: int | None = None, kv_address: tuple[str, int] = ("", 0)) -> None:
        cfg = model.cfg
        self.model = model
        self.role = role
        self.engine_id = engine_id
        self.max_model_len = max_model_len
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  model.dtype)
        self.layout = KVLayout(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                               str(model.dtype).removeprefix("torch."))
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler(seed)
        self.leases = LeaseTable(lease_seconds)
        self.kv_address = kv_address
        # handed over from the event loop (deque append/popleft are thread-safe)
        self.incoming: deque[Sequence] = deque()
        self.aborts: deque[str] = deque()
        self.imports_done: deque[tuple[Sequence, Exception | None]] = deque()
        # counters
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- KVSource (export side; called by transports from any thread) -----------------------------------------
    def acquire(self, lease_id: str) -> KVLease:
        return self.leases.acquire(lease_id)

    async def wait_layer(self, lease_id: str, layer: int) -> None:
        return None  # leases are created after the whole prefill ran

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
            num_running=len(self.scheduler.running) + len(self.scheduler.importing),
            num_waiting=len(self.scheduler.waiting) + len(self.incoming),
            kv_cache_usage=alloc.num_used / alloc.num_blocks,
            num_blocks_total=alloc.num_blocks,
            num_blocks_free=alloc.num_free,
            num_kv_leases=len(self.leases),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions,
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
        if plan.prefill:
            self._run_prefill(plan.prefill, res)
        elif plan.decode:
            self._run_decode(plan.decode, res)
        return res

    def _run_prefill(self, seqs: list[Sequence], res: StepResult) -> None:
        tokens = [s.all_tokens() for s in seqs]
        fb = build_prefill(tokens, [s.block_ids for s in seqs], self.cache.block_size)
        logits = self.model.forward(fb, self.cache.layers)
        next_tokens = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        res.ran_forward = True
        for seq, tok in zip(seqs, next_tokens):
            if not seq.output_ids:  # first time (not a recompute after preemption)
                self.prompt_tokens_total += len(seq.prompt_ids)
            out = seq.append_token(tok)
            self.generation_tokens_total += 1
            if out.finished:
                if seq.mode is Mode.PREFILL_HOP:
                    out.kv_transfer_params = self._lease(seq)
                    seq.block_ids = []
                else:
                    self.scheduler.free(seq)
                seq.status = Status.FINISHED
            else:
                self.scheduler.running.append(seq)
            res.outputs.append(out)

    def _run_decode(self, seqs: list[Sequence], res: StepResult) -> None:
        fb = build_decode([s.output_ids[-1] for s in seqs], [s.num_tokens for s in seqs],
                          [s.block_ids for s in seqs], self.cache.block_size, self.model.dtype)
        logits = self.model.forward(fb, self.cache.layers)
        if all(s.greedy for s in seqs):
            next_tokens = logits.argmax(dim=-1).tolist()
        else:
            next_tokens = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        res.ran_forward = True
        self.generation_tokens_total += len(seqs)
        outputs = res.outputs
        for seq, tok in zip(seqs, next_tokens):
            out = seq.append_token(tok)
            if out.finished:
                self.scheduler.remove(seq)
            outputs.append(out)

    def _lease(self, seq: Sequence) -> dict:
        lease_id = new_lease_id()
        self.leases.create(lease_id, seq.block_ids, len(seq.prompt_ids))
        host, port = self.kv_address
        return {
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
        first = int(params["first_token_ids"][0])
        self.prompt_tokens_total += len(seq.prompt_ids)
        if seq.generator is not None:  # the prefill worker drew the first token from the same seed
            advance_generator(seq.generator, self.model.cfg.vocab_size)
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
