"""KV caches of the CUDA model: one sequence's keys and values per layer, float16 on the device.

CudaKVCache holds per layer k, v float16 (1, Hkv, n_alloc, D), either views of the pool's `kv`
region (the start-up cache: `pooled`, the one decode and prefill graphs are captured on) or arrays
allocated outside the pool at set-up time. `length` tokens are valid; a pass over T tokens writes rows
[length, length + T) and the model advances `length` after it. A shuttled model's caches
(cuda/shuttle.py ShuttleKVCache) keep the streamed layers' K/V in pinned RAM instead.
"""
from __future__ import annotations


class CudaKVCache:
    def __init__(self, k, v, n_ctx: int, pooled: bool):
        self.k, self.v = k, v
        self.n_ctx = n_ctx
        self.pooled = pooled
        self.length = 0

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n  # later writes overwrite; attention never reads past pos[t]
