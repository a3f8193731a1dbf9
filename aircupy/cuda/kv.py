"""KV caches of the CUDA model: where a forward pass stores and reads keys and values, float16.

Two layouts (cuda/ops/layers.py and cuda_src/common.cuh kv_row give the addressing):
  paged  per layer (num_blocks, Hkv, bs, hd), bs a power of two (KV_BLOCK): the block pool of the
         pool's `kv` region. A continuous-batching step (StepKV) reads each sequence's blocks through
         its block table and writes row t at slot_mapping[t] = block * bs + offset (engine/blocks.py).
         A single-sequence cache (CudaKVCache with a `table`) is the same pool read through the
         identity table 0, 1, ..., so position p lives at slot p: its slots are its positions.
  slab   per layer (1, Hkv, n_alloc, hd): the KV shuttle's caches (cuda/shuttle.py), whose streamed
         layers' K/V live in pinned RAM and ride up with their layer as one contiguous run per head.

Every KV object a forward pass takes answers three questions (cuda/forward.py):
    kc, vc = kv.layer(i)                       # layer i's K and V arrays
    slots, seq, tables = kv.addressing(pos)    # device int32 arrays or None (slab: None, None, None)
    kv.segments(T)                             # attention launches: (row0, row1, kernel) over the T rows
"""
from __future__ import annotations

import numpy as np

KV_BLOCK = 32   # tokens per paged block: the engine's block size on the CUDA backend


class CudaKVCache:
    """One sequence's cache. k[i], v[i]: paged pool arrays with `table` (device int32 (1, nb), the
    identity block table), or slab arrays (table None). `length` tokens are valid; a pass over T
    tokens writes positions [length, length + T) and the model advances `length` after it."""

    def __init__(self, k, v, n_ctx: int, pooled: bool, table=None):
        self.k, self.v = k, v
        self.n_ctx = n_ctx
        self.pooled = pooled
        self.table = table
        self.length = 0

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def addressing(self, pos):
        return (pos, None, self.table) if self.table is not None else (None, None, None)

    def segments(self, T: int):
        return ((0, T, None),)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n  # later writes overwrite; attention never reads past pos[t]


class PagedKV:
    """The model's block pool, what model.new_kv_pool() hands the engine: k[i], v[i] float16
    (num_blocks, Hkv, block_size, hd) views of the device pool. Holds no positions or lengths: the
    scheduler's block tables say what is valid (the numpy twin is reference/paged_kv.PagedKVCache)."""

    def __init__(self, k, v, block_size: int):
        self.k, self.v = k, v
        self.num_blocks = int(k[0].shape[0])
        self.block_size = int(block_size)

    def __repr__(self) -> str:
        return f"PagedKV({len(self.k)} layers, {self.num_blocks} blocks of {self.block_size})"


class StepKV:
    """One continuous-batching step's view of the pool: the step's slots, per-row table index and
    block tables (device int32 views the step runner filled), and its attention launches."""

    def __init__(self, pool: PagedKV, slots, seq, tables, segments):
        self.pool, self.slots, self.seq, self.tables = pool, slots, seq, tables
        self._segments = tuple(segments)

    def layer(self, i: int):
        return self.pool.k[i], self.pool.v[i]

    def addressing(self, pos):
        return self.slots, self.seq, self.tables

    def segments(self, T: int):
        return self._segments


def attention_segments(query_start: np.ndarray, decode_max_rows: int) -> list[tuple[int, int, str]]:
    """Attention launches of a step whose chunks start at query_start (S + 1,): runs of consecutive
    chunks of <= decode_max_rows rows (decode rows, short chunks) go to the decode kernel together
    (its rows are independent); a longer chunk (a prompt) gets the tiled prefill kernel, alone,
    since that kernel's rows must belong to one sequence."""
    out: list[tuple[int, int, str]] = []
    run0 = None
    for s in range(len(query_start) - 1):
        r0, r1 = int(query_start[s]), int(query_start[s + 1])
        if r1 - r0 <= decode_max_rows:
            run0 = r0 if run0 is None else run0
            continue
        if run0 is not None:
            out.append((run0, r0, "decode"))
            run0 = None
        out.append((r0, r1, "prefill"))
    if run0 is not None:
        out.append((run0, int(query_start[-1]), "decode"))
    return out
