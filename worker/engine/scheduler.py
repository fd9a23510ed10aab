"""Continuous batching: which sequences run in the next step, and who owns which KV blocks.

Each step is either a prefill step (newly admitted sequences, up to `max_num_batched_tokens` prompt tokens)
or a decode step (one token for every running sequence). Waiting sequences are admitted FIFO as soon as
there is room (`max_num_seqs`, free blocks), so new requests join between decode steps and finished ones
leave. When a decode step needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed (prompt + tokens so far) later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import PagedKVCache
from .sequence import Mode, Sequence, Status


@dataclass
class ScheduledStep:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    start_imports: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.cache = cache
        self.alloc = cache.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.importing: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # -- membership -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return self.importing.get(request_id)

    def remove(self, seq: Sequence, free_blocks: bool = True) -> None:
        """Take a sequence out of the scheduler (finished or aborted); frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.IMPORTING:
            self.importing.pop(seq.request_id, None)
        seq.status = Status.FINISHED
        if free_blocks:
            self.free(seq)

    def free(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.alloc.free(seq.block_ids)
            seq.block_ids = []

    def import_done(self, seq: Sequence) -> None:
        """The sequence's KV arrived: it decodes from now on."""
        self.importing.pop(seq.request_id, None)
        seq.status = Status.RUNNING
        self.running.append(seq)

    # -- planning ---------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_num_batched_tokens
        while self.waiting:
            if len(self.running) + len(self.importing) + len(step.prefill) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.mode is Mode.IMPORT and not seq.output_ids:  # KV comes from the prefill worker
                need = self.cache.blocks_for(len(seq.prompt_ids))
                if not self.alloc.can_allocate(need):
                    break
                self.waiting.popleft()
                seq.block_ids = self.alloc.allocate(need)
                seq.status = Status.IMPORTING
                self.importing[seq.request_id] = seq
                step.start_imports.append(seq)
                continue
            n = seq.num_tokens
            if step.prefill and n > budget:
                break
            need = self.cache.blocks_for(n)
            reserve = self.watermark_blocks if (self.running or step.prefill) else 0
            if not self.alloc.can_allocate(need + reserve):
                break
            self.waiting.popleft()
            seq.block_ids = self.alloc.allocate(need)
            seq.status = Status.RUNNING  # joins `running` after its prefill step
            step.prefill.append(seq)
            budget -= n
        if step.prefill:
            return step
        # decode: every running sequence needs room for the K/V of its newest token
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = self.cache.blocks_for(seq.num_tokens) - len(seq.block_ids)
            while need > 0 and not self.alloc.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq itself was the newest and got preempted
            if need > 0:
                seq.block_ids.extend(self.alloc.allocate(need))
            i += 1
        step.decode = list(self.running)
        return step

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
