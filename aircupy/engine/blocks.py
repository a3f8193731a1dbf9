"""Paged KV block manager: fixed-size blocks of KV slots, one block table per sequence, prefix caching.

The KV cache is `num_blocks` blocks of `block_size` (B) token slots; slot = block_id * B + offset. A
sequence's BlockTable lists its blocks in position order: ids[i] holds the KV of positions
[i*B, (i+1)*B). The physical layout of a block (layers, K and V, dtype) is the backend's business:
this module hands out block ids and slot numbers, nothing else.

Prefix caching. A block whose B tokens all have their KV written (a full block) is registered under a
chained hash h_i = blake2b(h_{i-1} || token ids of block i), h_{-1} = b"". Equal hashes mean equal
tokens from position 0 to the block's end, hence equal KV at equal positions, so a sequence whose
tokens start the same way takes the block instead of recomputing it: a chat's next turn, the n
choices of one prompt, a preempted sequence coming back. A 16-byte blake2b rather than hash(): a
64-bit tuple hash is not collision resistant, and a collision would silently serve another prompt's KV.

A block's life:
  free, clean   holds nothing worth keeping; handed out first.
  in use        refcount = the number of tables that hold it (>= 1).
  free, cached  refcount 0 but registered: findable by its hash until it is reused, least recently
                freed first (an eviction). A table is freed tail first, so a prefix's first block
                outlives the blocks after it (a chain is useless without its head).

The invariant that makes copy-on-write unnecessary: every KV write goes to a block held by exactly one
table and not registered; a block is registered only once full and is read-only from then on. Blocks
are shared only through admit(), which takes registered full blocks and never the block holding the
sequence's last token (that token always runs again, so the model yields logits). slots(write=True)
asserts the invariant for every write it maps; truncate() unregisters, or drops, a registered block it
cuts into rather than ever writing into it.

Registration happens when a step is scheduled (register_full, with the number of tokens whose KV the
step will have written), so a sequence admitted later in the same step may already read those blocks:
a runner must make a step's KV writes visible to the step's later chunks (write every row's KV of a
layer before that layer's attention, or run the chunks in step order).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np


class NoFreeBlocksError(RuntimeError):
    """An allocation was asked for more blocks than are free: the caller should have checked first."""


def block_hash(parent: bytes, tokens) -> bytes:
    """Chained hash of one full block: 16 bytes from the parent block's hash and the block's token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return h.digest()


class BlockTable:
    """One sequence's blocks. ids[i] holds positions [i*B, (i+1)*B).

    hashes[i] caches the chained hash of the tokens of positions [0, (i+1)*B) (valid while those
    tokens stand; kept across free() so a preempted sequence's lookups are cheap). num_registered
    counts the leading full blocks already offered to the prefix cache (registered, or duplicates of a
    block registered first elsewhere); the manager owns every field.
    """

    __slots__ = ("ids", "hashes", "num_registered")

    def __init__(self):
        self.ids: list[int] = []
        self.hashes: list[bytes] = []
        self.num_registered = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"BlockTable({self.ids}, registered={self.num_registered})"


class BlockManager:
    """Hands out blocks to BlockTables; see the module docstring for the life cycle and invariant."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
                or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if num_blocks * block_size > 2**31:
            raise ValueError("num_blocks * block_size must fit int32 slot ids")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks   # the hash a block is registered under
        self._by_hash: dict[bytes, int] = {}
        self._clean: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()      # free registered blocks, oldest first
        self.query_tokens = 0      # tokens of admitted sequences (the prefix cache's queries)
        self.hit_tokens = 0        # of which found in the cache
        self.evictions = 0         # cached blocks reused for something else

    # -- state ------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: clean ones and cached ones (evicted when taken)."""
        return len(self._clean) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks still findable by their hash."""
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_registered(self, block: int) -> bool:
        return self._hash_of[block] is not None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission: prefix lookup and allocation --------------------------------------------------
    def blocks_to_admit(self, table: BlockTable, token_ids) -> int:
        """Free blocks that admit(table, token_ids) would take: new blocks for what the prefix cache
        lacks, plus cached blocks it would revive (those leave the free pool too)."""
        hits = self._lookup(table, token_ids)
        return self.blocks_for(len(token_ids)) - len(hits) + sum(self._ref[b] == 0 for b in hits)

    def admit(self, table: BlockTable, token_ids) -> int:
        """Give an empty table blocks for all of token_ids, reusing registered blocks of its longest
        cached prefix. Returns how many tokens have their KV already (a multiple of B, and always
        below len(token_ids): the last token is left to compute)."""
        if not len(token_ids):
            raise ValueError("admit() needs at least one token")
        if table.ids:
            raise ValueError("admit() takes an empty table")
        cost = self.blocks_to_admit(table, token_ids)
        if cost > self.num_free:
            raise NoFreeBlocksError(f"admission needs {cost} free blocks, {self.num_free} are free")
        hits = self._lookup(table, token_ids)
        for b in hits:
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1
        table.ids = hits + [self._allocate() for _ in range(self.blocks_for(len(token_ids)) - len(hits))]
        table.num_registered = len(hits)
        cached = len(hits) * self.block_size
        self.query_tokens += len(token_ids)
        self.hit_tokens += cached
        return cached

    def _lookup(self, table: BlockTable, token_ids) -> list[int]:
        """Registered blocks of the longest cached prefix among the full blocks before the last token."""
        hits = []
        for i in range((len(token_ids) - 1) // self.block_size):
            b = self._by_hash.get(self._hash(table, token_ids, i))
            if b is None:
                break
            hits.append(b)
        return hits

    def _hash(self, table: BlockTable, token_ids, i: int) -> bytes:
        """Chained hash of block i of token_ids, extending the table's cache up to it."""
        B = self.block_size
        while len(table.hashes) <= i:
            j = len(table.hashes)
            assert len(token_ids) >= (j + 1) * B, "only full blocks have a hash"
            parent = table.hashes[-1] if j else b""
            table.hashes.append(block_hash(parent, token_ids[j * B:(j + 1) * B]))
        return table.hashes[i]

    # -- growth, registration, slot mapping -------------------------------------------------------
    def blocks_to_grow(self, table: BlockTable, num_tokens: int) -> int:
        """New blocks the table needs to cover positions [0, num_tokens)."""
        return max(0, self.blocks_for(num_tokens) - len(table.ids))

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Add fresh blocks until the table covers positions [0, num_tokens) (the next decode slot)."""
        need = self.blocks_to_grow(table, num_tokens)
        if need > self.num_free:
            raise NoFreeBlocksError(f"growth needs {need} free blocks, {self.num_free} are free")
        table.ids.extend(self._allocate() for _ in range(need))

    def register_full(self, table: BlockTable, token_ids, num_tokens: int) -> None:
        """Offer to the prefix cache every full block among positions [0, num_tokens), whose KV is (or
        will be by the end of the step being scheduled) written. A block whose hash is already taken
        by another block stays unregistered: a duplicate, freed as clean."""
        n_full = min(num_tokens, len(token_ids)) // self.block_size
        assert n_full <= len(table.ids), "register_full past the table's blocks"
        for i in range(table.num_registered, n_full):
            h, b = self._hash(table, token_ids, i), table.ids[i]
            assert self._hash_of[b] in (None, h), f"block {b} registered under another hash"
            if self._hash_of[b] is None and h not in self._by_hash:
                self._hash_of[b] = h
                self._by_hash[h] = b
        table.num_registered = max(table.num_registered, n_full)

    def slots(self, table: BlockTable, start: int, end: int, write: bool = False) -> np.ndarray:
        """(end - start,) int32 slot ids of positions [start, end) of the table's sequence. With
        write=True (a chunk's KV writes) assert that each block written is private and unregistered."""
        B = self.block_size
        assert 0 <= start <= end <= len(table.ids) * B, (start, end, len(table.ids))
        if write:
            for i in range(start // B, self.blocks_for(end)):
                b = table.ids[i]
                assert self._ref[b] == 1 and self._hash_of[b] is None, \
                    f"write into block {b} (refcount {self._ref[b]}, registered {self.is_registered(b)})"
        pos = np.arange(start, end, dtype=np.int64)
        ids = np.asarray(table.ids, dtype=np.int64)
        return (ids[pos // B] * B + pos % B).astype(np.int32)

    # -- release ----------------------------------------------------------------------------------
    def truncate(self, table: BlockTable, num_tokens: int) -> int:
        """Keep the KV of positions [0, num_tokens) and release the blocks after it (rollback).

        The block the cut falls in will be written again, so it must become writable: a private
        registered one is unregistered; a shared one is dropped, and the KV kept ends at its start.
        Returns the number of tokens whose KV is kept (num_tokens, or that block start)."""
        B = self.block_size
        assert num_tokens >= 0
        keep = self.blocks_for(num_tokens)
        while len(table.ids) > keep:
            self._release(table.ids.pop())
        kept = min(num_tokens, len(table.ids) * B)
        if kept % B and table.ids:
            b = table.ids[-1]
            if self._ref[b] > 1:
                self._release(table.ids.pop())
                kept -= kept % B
            elif self._hash_of[b] is not None:
                self._unregister(b)
        table.num_registered = min(table.num_registered, kept // B)
        del table.hashes[kept // B:]
        return kept

    def free(self, table: BlockTable) -> None:
        """Release every block of the table, tail first (see the module docstring); keeps its hashes."""
        while table.ids:
            self._release(table.ids.pop())
        table.num_registered = 0

    def clear_cache(self) -> None:
        """Forget every registered hash (after a failed step: registered blocks may hold partial KV)."""
        for b in list(self._by_hash.values()):
            self._unregister(b)

    def _allocate(self) -> int:
        if self._clean:
            b = self._clean.popleft()
        else:
            b, _ = self._cached.popitem(last=False)   # evict the least recently freed
            del self._by_hash[self._hash_of[b]]
            self._hash_of[b] = None
            self.evictions += 1
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        assert self._ref[b] > 0, f"block {b} released more often than taken"
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if self._hash_of[b] is None:
                self._clean.append(b)
            else:
                self._cached[b] = None

    def _unregister(self, b: int) -> None:
        del self._by_hash[self._hash_of[b]]
        self._hash_of[b] = None
        if b in self._cached:
            del self._cached[b]
            self._clean.append(b)

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(blocks_total=self.num_blocks, blocks_used=self.num_used, blocks_free=self.num_free,
                    blocks_cached=self.num_cached, block_size=self.block_size,
                    prefix_query_tokens=self.query_tokens, prefix_hit_tokens=self.hit_tokens,
                    evictions=self.evictions)

    def check(self) -> None:
        """Assert the manager's own bookkeeping (tests call it after every operation): the free pools
        are exactly the blocks of refcount 0, cached ones registered and clean ones not, and the hash
        index is a bijection with the registered blocks."""
        clean, cached = set(self._clean), set(self._cached)
        assert len(clean) == len(self._clean) and not clean & cached
        assert clean | cached == {b for b, r in enumerate(self._ref) if r == 0}
        assert all(r >= 0 for r in self._ref)
        assert all(self._hash_of[b] is not None for b in cached)
        assert all(self._hash_of[b] is None for b in clean)
        assert {b: h for h, b in self._by_hash.items()} == \
            {b: h for b, h in enumerate(self._hash_of) if h is not None}
