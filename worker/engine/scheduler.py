"""Continuous batching: which tokens run in the next step, and who owns which KV blocks.

Two step shapes, chosen per engine (`chunked`):

- **Whole prompts** (prefill role): a step is either a prefill step (newly admitted sequences, whole prompts, up
  to `max_num_batched_tokens` prompt tokens) or a decode step (one token for every running sequence). A
  prefill worker has no decodes to protect, and whole prompts batch best.
- **Chunked prefill** (Sarathi-Serve; `both` and `decode` roles): every step has a token budget. Every running
  sequence decodes one token first, then the budget left goes to prompt chunks: prompts already started,
  oldest first, then newly admitted ones. A long prompt is cut into chunks over several steps, so it never
  stalls the running decodes for a whole prompt's forward (TPOT stays bounded by the budget), and decodes ride
  along with prefill compute instead of waiting for it.

Waiting sequences are admitted FIFO as soon as there is room (`max_num_seqs`, free blocks for the whole
sequence, so a started prompt never waits for blocks). With prefix caching, admission first takes the cached
blocks of the longest known prefix (`kv_cache.block_keys`) and only the rest is computed. When a decode needs
a block and none is free, the newest sequence is preempted (a prompt still being chunked first, then the newest
decoding one): its blocks are released and it goes back to the front of the queue, to be recomputed (prompt +
tokens so far) later -- the blocks it had computed stay in the prefix cache until evicted, so that is cheap.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import PagedKVCache, block_keys
from .sequence import Mode, Sequence, Status


@dataclass
class Chunk:
    """Prompt tokens [start, start + len(tokens)) of `seq` computed in this step."""

    seq: Sequence
    start: int
    tokens: list[int]

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token: its logits give the next token."""
        return self.start + len(self.tokens) == self.seq.num_tokens


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    start_imports: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(c.tokens) for c in self.prefill)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, chunked: bool = False) -> None:
        self.cache = cache
        self.alloc = cache.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = chunked
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt partly computed (chunked prefill)
        self.running: list[Sequence] = []  # decoding
        self.importing: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # -- membership -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.importing)

    def find(self, request_id: str) -> Sequence | None:
        for group in (self.running, self.prefilling, self.waiting):
            for seq in group:
                if seq.request_id == request_id:
                    return seq
        return self.importing.get(request_id)

    def remove(self, seq: Sequence, free_blocks: bool = True) -> None:
        """Take a sequence out of the scheduler (finished or aborted); frees its blocks."""
        if seq.status is Status.RUNNING:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            elif seq in self.running:
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

    def import_done(self, seq: Sequence, last_position: bool = False) -> None:
        """The sequence's KV arrived: it decodes from now on, or, with `last_position` (the prefill worker
        announced its KV before it had the first token), first computes its prompt's last position again -- a
        one-token chunk against the imported cache -- for the logits of the first token."""
        self.importing.pop(seq.request_id, None)
        seq.status = Status.RUNNING
        (self.prefilling if last_position else self.running).append(seq)

    def prefill_done(self, seq: Sequence) -> None:
        """The sequence's prompt is computed and it got its next token: it decodes from the next step."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self.running.append(seq)

    # -- planning ---------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        if not self.chunked:
            budget = self.max_num_batched_tokens
            for seq in self.prefilling:  # (only imported prompts computing their last position)
                budget -= self._chunk(step, seq, seq.num_tokens - seq.num_computed)
            self._admit_waiting(step, budget, whole=True)
            if step.prefill:
                return step
            self._schedule_decode(step)
            return step
        self._schedule_decode(step)
        budget = self.max_num_batched_tokens - len(step.decode)
        for seq in self.prefilling:
            if budget <= 0:
                break
            budget -= self._chunk(step, seq, budget)
        self._admit_waiting(step, budget, whole=False)
        return step

    def _chunk(self, step: ScheduledStep, seq: Sequence, budget: int) -> int:
        start = seq.num_computed
        n = min(seq.num_tokens - start, budget)
        step.prefill.append(Chunk(seq, start, seq.all_tokens()[start:start + n]))
        return n

    def _admit_waiting(self, step: ScheduledStep, budget: int, whole: bool) -> None:
        admitted = 0  # whole prompts admitted this step (they join `running` only after it)
        while self.waiting:
            if self.num_active + admitted >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.mode is Mode.IMPORT and not seq.output_ids:  # KV comes from the prefill worker
                need = self.cache.blocks_for(len(seq.prompt_ids))
                if not self.alloc.can_allocate(need):
                    break
                self.waiting.popleft()
                seq.block_ids = self.alloc.allocate(need)
                seq.num_computed = 0
                seq.status = Status.IMPORTING
                self.importing[seq.request_id] = seq
                step.start_imports.append(seq)
                continue
            if budget <= 0 and (step.prefill or not whole):
                break
            busy = bool(self.running or self.prefilling or step.prefill)
            if whole and step.prefill and seq.num_tokens > budget:
                break  # (a lone prompt longer than the budget still runs: it must fit in one step)
            if not self._allocate(seq, self.watermark_blocks if busy else 0):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if whole:  # joins `running` after its prefill step
                admitted += 1
                budget -= self._chunk(step, seq, seq.num_tokens - seq.num_computed)
            else:
                self.prefilling.append(seq)
                budget -= self._chunk(step, seq, budget)

    def _allocate(self, seq: Sequence, reserve: int) -> bool:
        """Blocks for all of `seq`'s tokens, the longest cached prefix shared. False when they do not fit."""
        tokens = seq.all_tokens()
        bs = self.cache.block_size
        hit: list[int] = []
        if self.alloc.caching and seq.mode is not Mode.IMPORT:
            seq.block_keys = block_keys(tokens, bs)
            # at least the last token is computed here: its logits give the next token (and a shared block
            # is never written)
            hit = self.alloc.lookup(seq.block_keys[:(len(tokens) - 1) // bs])
            self.alloc.share(hit)
        need = self.cache.blocks_for(len(tokens)) - len(hit)
        if not self.alloc.can_allocate(need + reserve):
            self.alloc.free(hit)
            return False
        seq.block_ids = hit + self.alloc.allocate(need)
        seq.num_computed = len(hit) * bs
        seq.num_registered = len(hit)
        if self.alloc.caching and seq.mode is not Mode.IMPORT:
            self.prefix_queries += len(tokens)
            self.prefix_hits += seq.num_computed
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Offer `seq`'s newly computed full blocks to the prefix cache."""
        bs = self.cache.block_size
        full = min(seq.num_computed // bs, len(seq.block_ids))
        if full <= seq.num_registered or not self.alloc.caching:
            return
        keys = seq.block_keys
        if len(keys) < full:
            tokens = seq.all_tokens()
            keys += block_keys(tokens[:full * bs], bs, keys[-1] if keys else b"", len(keys))
        for b in range(seq.num_registered, full):
            self.alloc.register(seq.block_ids[b], keys[b])
        seq.num_registered = full

    def _schedule_decode(self, step: ScheduledStep) -> None:
        """Every running sequence decodes one token; it needs room for the K/V of its newest token."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = self.cache.blocks_for(seq.num_tokens) - len(seq.block_ids)
            while need > 0 and not self.alloc.can_allocate(need):
                victim = self.prefilling[-1] if self.prefilling else self.running[-1]
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

    def _preempt(self, seq: Sequence) -> None:
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            self.running.remove(seq)
        self.free(seq)
        seq.num_computed = 0
        seq.num_registered = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
