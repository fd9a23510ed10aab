"""The paged KV cache: per-layer K/V tensors split into fixed-size blocks, and the block allocator.

Blocks are reference-counted so that sequences sharing a prompt prefix share its KV (prefix caching, as vLLM's
automatic prefix caching): a *full* block whose tokens (and everything before them) are known is registered under
a key chained from its predecessor's, `block_keys`. A block whose last user frees it stays cached (evictable,
least recently freed first) until the allocator needs it for something else, so a later request with the same
prefix finds it. Only full blocks computed by this engine are ever shared, and a shared block is never written
again (a prompt keeps at least its last token to compute), so sharing needs no copy-on-write.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

#: The key of the (absent) block before the first one.
ROOT_KEY = b""


def block_keys(tokens: Sequence[int], block_size: int, parent: bytes = ROOT_KEY, start: int = 0) -> list[bytes]:
    """Chained keys of the full blocks of `tokens` from block `start` on (`parent`: the key of block start-1).

    A key is a 128-bit BLAKE2b digest of the parent key and the block's token ids, so equal keys mean equal
    prefixes (a Python `hash` chain could collide, and a wrong hit would silently corrupt a generation)."""
    keys = []
    for b in range(start, len(tokens) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[b * block_size:(b + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


class BlockAllocator:
    """Block ids with exact accounting: every block is free, cached-and-evictable, or owned by >= 1 users.

    `allocate` hands out blocks with one reference (fresh ones first, then the least recently freed cached
    ones, whose keys it forgets); `share` adds a reference to cached blocks; `free` drops one reference per
    block, and a block nobody uses goes back to the free list, or to the evictable set when it is cached.
    """

    def __init__(self, num_blocks: int, caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.caching = caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"KV cache: {n} blocks wanted, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                del self._by_key[self._key_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        refs = self._refs
        for b in blocks:
            if refs[b] <= 0:
                raise RuntimeError(f"KV cache: block {b} freed twice")
            refs[b] -= 1
            if refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # -- prefix caching -------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks for the longest prefix of `keys` (no references taken: see `share`)."""
        out = []
        for k in keys:
            b = self._by_key.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def share(self, blocks: list[int]) -> None:
        """Take one more reference to each of `blocks` (cached blocks found by `lookup`)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1

    def register(self, block: int, key: bytes) -> bool:
        """Cache a full, computed block under `key`; False when the key is cached already (another sequence
        computed the same prefix at the same time: this block then stays private) or caching is off."""
        if not self.caching or key in self._by_key or block in self._key_of:
            return False
        self._by_key[key] = block
        self._key_of[block] = key
        return True

    def refcount(self, block: int) -> int:
        return self._refs[block]


class PagedKVCache:
    """K and V for every layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, prefix_caching: bool = True) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks, caching=prefix_caching)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def usage(self) -> float:
        return self.allocator.num_used / self.num_blocks

    # -- block-level copies, used by the KV transports ------------------------------------------------------
    def read_blocks(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of `block_ids` in one layer: `[len(block_ids), block_size, kv_heads, head_dim]`."""
        idx = torch.tensor(block_ids, dtype=torch.long)
        k, v = self.layers[layer]
        return k.index_select(0, idx), v.index_select(0, idx)

    def write_blocks(self, layer: int, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long)
        kc, vc = self.layers[layer]
        kc.index_copy_(0, idx, k.to(kc.dtype))
        vc.index_copy_(0, idx, v.to(vc.dtype))
