"""One sequence's KV cache for the numpy model: preallocated float32 arrays, filled left to right.

Layout per layer: k (Hkv, n_ctx, D) and v (Hkv, n_ctx, Dv), head-major so that the visible keys of a
head, k[h, :S], are one contiguous (S, D) block for the attention matmul. The position of every stored
token is kept too: masks are computed from positions, not from slot indices.
"""
from __future__ import annotations

import numpy as np

from aircupy.errors import ContextLengthError


class KVCache:
    def __init__(self, n_layers: int, n_ctx: int, n_head_kv: int, head_dim: int, head_dim_v: int):
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        # np.zeros maps untouched pages lazily, so a large n_ctx costs memory only as it fills.
        self.k = [np.zeros((n_head_kv, n_ctx, head_dim), dtype=np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_head_kv, n_ctx, head_dim_v), dtype=np.float32) for _ in range(n_layers)]
        self.positions = np.zeros(n_ctx, dtype=np.int64)
        self.length = 0  # tokens stored (committed); slots [length, n_ctx) are free

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.n_ctx:
            raise ContextLengthError(
                f"{self.length} cached + {n_new} new tokens exceed the cache size of {self.n_ctx}")

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k (T, Hkv, D) and v (T, Hkv, Dv) of the tokens being processed in slots
        [length, length + T) of `layer`; return the visible keys/values (Hkv, length + T, D|Dv).
        The new tokens become part of the cache only at commit()."""
        start, end = self.length, self.length + k.shape[0]
        self.k[layer][:, start:end] = k.transpose(1, 0, 2)
        self.v[layer][:, start:end] = v.transpose(1, 0, 2)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def key_positions(self, new_positions: np.ndarray) -> np.ndarray:
        """Positions of the visible keys: the stored ones, then the tokens being processed. (S,)"""
        return np.concatenate([self.positions[:self.length], np.asarray(new_positions, dtype=np.int64)])

    def commit(self, positions: np.ndarray) -> None:
        """Called once every layer has written the step's tokens."""
        n = len(positions)
        self.positions[self.length:self.length + n] = positions
        self.length += n

    def truncate(self, n: int) -> None:
        """Drop every token past the first n (prefix reuse); the slots are overwritten later."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
