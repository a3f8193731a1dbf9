"""PagedKVCache: the numpy model's KV pool for a continuous-batching step, addressed by slot ids.

The scheduler's block manager (engine/blocks.py) hands out blocks of B token slots; slot = block * B +
offset. This class owns the memory those numbers point at, per layer:

    k[layer] (num_blocks * B, Hkv, D)    v[layer] (num_blocks * B, Hkv, Dv)    float32, slot-major

Slot-major, so that one step's writes (N rows at N slot ids) are one fancy-indexed assignment, and a
block is B consecutive rows: a chunk's visible keys are gathered block by block through its block table
(one copy of whole blocks, then a slice to the positions wanted). The pool holds no positions and no
lengths: the block tables, positions and context lengths of each Step say what is valid. Blocks are
never cleared (a freed block keeps its old KV until rewritten); only positions [0, context_len) of a
chunk are ever read, and the scheduler guarantees those were written.

Memory: np.zeros maps pages lazily, so an untouched block costs nothing; but the block manager cycles
through its free blocks, so over a long run every block gets touched and the resident size approaches
bytes_for(...) of the whole pool. Size the pool from the memory budget with blocks_for_budget().
"""
from __future__ import annotations

import numpy as np

_F32 = 4


class PagedKVCache:
    """kv = PagedKVCache(n_layers, num_blocks, block_size, n_head_kv, head_dim, head_dim_v)
    kv.write(layer, slots (N,), k (N, Hkv, D), v (N, Hkv, Dv))
    keys, values = kv.gather(layer, block_table, lo, hi)     # (Hkv, hi - lo, D|Dv), positions [lo, hi)
    keys, values = kv.gather_rows(layer, slots (n, S))       # (n, Hkv, S, D|Dv), each row its own keys"""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_head_kv: int, head_dim: int,
                 head_dim_v: int):
        for name, n in (("n_layers", n_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("n_head_kv", n_head_kv), ("head_dim", head_dim), ("head_dim_v", head_dim_v)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        self.n_layers, self.num_blocks, self.block_size = int(n_layers), int(num_blocks), int(block_size)
        self.n_head_kv, self.head_dim, self.head_dim_v = int(n_head_kv), int(head_dim), int(head_dim_v)
        self.num_slots = self.num_blocks * self.block_size
        # np.zeros: the OS maps the pages on first touch, so an idle pool costs address space only.
        self.k = [np.zeros((self.num_slots, n_head_kv, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((self.num_slots, n_head_kv, head_dim_v), np.float32) for _ in range(n_layers)]

    # -- sizing -----------------------------------------------------------------------------------
    @staticmethod
    def bytes_for(n_layers: int, num_blocks: int, block_size: int, n_head_kv: int, head_dim: int,
                  head_dim_v: int) -> int:
        """Bytes of a pool of num_blocks blocks once every page is touched: L * blocks * B * Hkv * (D + Dv) * 4."""
        return n_layers * num_blocks * block_size * n_head_kv * (head_dim + head_dim_v) * _F32

    @classmethod
    def blocks_for_budget(cls, budget_bytes: int, n_layers: int, block_size: int, n_head_kv: int,
                          head_dim: int, head_dim_v: int) -> int:
        """The most blocks whose pool fits in budget_bytes (0 when not even one block does)."""
        per_block = cls.bytes_for(n_layers, 1, block_size, n_head_kv, head_dim, head_dim_v)
        return max(0, int(budget_bytes) // per_block)

    @property
    def nbytes(self) -> int:
        """The pool's full size (what it costs once every block has been written)."""
        return self.bytes_for(self.n_layers, self.num_blocks, self.block_size, self.n_head_kv,
                              self.head_dim, self.head_dim_v)

    # -- writes and reads -------------------------------------------------------------------------
    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store row n's k (N, Hkv, D) and v (N, Hkv, Dv) at slot slots[n] of `layer`. The slots of one
        step are distinct (the block manager maps every (sequence, position) to its own slot)."""
        self.k[layer][slots] = k
        self.v[layer][slots] = v

    def gather(self, layer: int, block_table: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys (Hkv, hi - lo, D) and values (Hkv, hi - lo, Dv) of positions [lo, hi) of the sequence
        whose blocks are block_table (block_table[i] holds positions [i*B, (i+1)*B); -1 pads the end),
        in the head-major layout ops.attention takes. Copies only the blocks covering [lo, hi)."""
        B = self.block_size
        b0, b1 = lo // B, -(-hi // B)
        blocks = np.asarray(block_table[b0:b1])
        assert 0 <= lo < hi and len(blocks) == b1 - b0 and (blocks >= 0).all(), (lo, hi, block_table)
        a, z = lo - b0 * B, hi - b0 * B
        H, NB = self.n_head_kv, self.num_blocks
        # (slots, Hkv, D) seen as (Hkv, blocks, B, D); take() copies the chosen blocks into one
        # contiguous (Hkv, nb, B, D) array, so each head's keys are a BLAS-ready (S, D) matrix.
        k = np.take(self.k[layer].reshape(NB, B, H, self.head_dim).transpose(2, 0, 1, 3), blocks, axis=1)
        v = np.take(self.v[layer].reshape(NB, B, H, self.head_dim_v).transpose(2, 0, 1, 3), blocks, axis=1)
        return k.reshape(H, -1, self.head_dim)[:, a:z], v.reshape(H, -1, self.head_dim_v)[:, a:z]

    def gather_rows(self, layer: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys (n, Hkv, S, D) and values (n, Hkv, S, Dv) at slots (n, S): each decode row's own keys,
        for ops.attention_rows. One copy; each (S, D) matrix is strided by Hkv*D, which BLAS takes."""
        k = np.take(self.k[layer], slots, axis=0)   # (n, S, Hkv, D)
        v = np.take(self.v[layer], slots, axis=0)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __repr__(self) -> str:
        return (f"PagedKVCache({self.n_layers} layers, {self.num_blocks} blocks of {self.block_size}, "
                f"Hkv={self.n_head_kv}, D={self.head_dim}/{self.head_dim_v}, {self.nbytes / 2**20:.1f} MiB)")
