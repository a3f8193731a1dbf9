"""The KV-cache shuttle: the KV of streamed layers lives in pinned RAM and rides up with its layer.

    shuttle = KVShuttle(k_slots, v_slots, n_head_kv, head_dim, n_ctx, copy_rows)
    kv = shuttle.bind(cache, pos0, T)      # one forward pass over T tokens at positions pos0 ..
    streamer.begin_pass(kv)                # the streamer calls kv.up / kv.down on its copy stream
    ...ForwardPass.layer(i, ..., kv)       # kv.layer(i): a shuttled layer's K/V are its slot's views

A shuttled layer's K and V are float16 (1, Hkv, n_ctx, hd) pinned host arrays of the cache
(ShuttleKVCache.k[i] / .v[i]); VRAM holds one KV slot per weight slot (same index: the slot the
SlotSchedule gives the layer), each a K and a V block of Hkv * n_ctx * hd float16 viewed as
(1, Hkv, n, hd) for a cache of n <= n_ctx tokens. Per streamed step of a pass at positions
[pos0, pos0 + T):
  up    (copy stream, before the layer's compute): rows [0, pos0) of every head, host -> slot, one
        2-D copy each for K and V (pitch n*hd*2 bytes, width pos0*hd*2, height Hkv). Skipped when
        the slot still holds this cache's layer from an earlier pass (a cached schedule: few
        streamed layers keep their slots) with at least pos0 valid rows, or when pos0 == 0.
  compute: kv_store writes the T new rows into the slot, attention reads [0, pos] from it.
  down  (copy stream, after the compute-done event): rows [pos0, pos0 + T), slot -> host.
The streamer issues every down of a slot before the next up into it on the same (in-order) copy
stream, so the host rows an up reads are always complete and a slot is never overwritten while
its compute or its download still reads it.

CUDA-free at import: the copies go through `copy_rows` (cuda_copy_rows on the GPU, a simulator's
copy in the CPU tests).
"""
from __future__ import annotations

import itertools

import numpy as np

from aircupy.cuda.kv import CudaKVCache

_H2D, _D2H = 1, 2   # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost


def cuda_copy_rows(dst, src, row0: int, rows: int, stream) -> None:
    """dst[:, :, row0:row0+rows] = src[:, :, row0:row0+rows] for float16 (1, Hkv, n, hd) arrays, one
    pinned numpy, one cupy (the direction follows from which is which): one cudaMemcpy2DAsync on
    `stream`, a row of the copy being one head's run of `rows` tokens."""
    import cupy
    n_seq, h, n, hd = dst.shape
    pitch, off = n * hd * 2, row0 * hd * 2
    up = isinstance(dst, cupy.ndarray)
    dptr = (dst.data.ptr if up else dst.ctypes.data) + off
    sptr = (src.ctypes.data if up else src.data.ptr) + off
    cupy.cuda.runtime.memcpy2DAsync(dptr, pitch, sptr, pitch, rows * hd * 2, n_seq * h,
                                    _H2D if up else _D2H, stream.ptr)


class ShuttleKVCache(CudaKVCache):
    """A cache of a shuttled model: k[i], v[i] are device arrays for resident layers and pinned host
    arrays for the layers in `host_layers`, all (1, Hkv, n_alloc, hd) with n_ctx <= n_alloc (the
    start-up cache keeps the model's n_ctx rows whatever its n_ctx). `token` names the cache in the
    slot tags (id() could be reused by a later cache)."""

    def __init__(self, k, v, n_ctx: int, host_layers, token: int):
        super().__init__(k, v, n_ctx, pooled=False)   # never the graph path: eager passes only
        self.host_layers = frozenset(host_layers)
        self.token = token
        self.n_alloc = int(k[min(self.host_layers)].shape[2]) if self.host_layers else n_ctx


class KVShuttle:
    def __init__(self, k_slots, v_slots, n_head_kv: int, head_dim: int, n_ctx: int, copy_rows):
        """k_slots[j], v_slots[j]: flat float16 device blocks of n_head_kv * n_ctx * head_dim."""
        self.k_slots, self.v_slots = k_slots, v_slots
        self.h, self.hd, self.n_ctx, self.copy_rows = n_head_kv, head_dim, n_ctx, copy_rows
        self._tags: list = [None] * len(k_slots)   # slot -> (cache token, layer, valid rows)
        self._tokens = itertools.count(1)
        self.bytes_up = self.bytes_down = 0

    def new_token(self) -> int:
        return next(self._tokens)

    def views(self, slot: int, n: int):
        """(k, v) of KV slot `slot` as float16 (1, Hkv, n, hd) for a cache of n tokens."""
        size = self.h * n * self.hd
        return (self.k_slots[slot][:size].reshape(1, self.h, n, self.hd),
                self.v_slots[slot][:size].reshape(1, self.h, n, self.hd))

    def bind(self, cache, pos0: int, T: int) -> "PassKV":
        if cache.n_alloc > self.n_ctx:
            raise ValueError(f"a cache of {cache.n_alloc} tokens exceeds the KV slots' {self.n_ctx}")
        return PassKV(self, cache, int(pos0), int(T))

    def invalidate(self) -> None:
        """After an aborted pass the slots' contents are no longer trusted."""
        self._tags = [None] * len(self._tags)


class PassKV:
    """The KV of one forward pass: `layer(i)` for ForwardPass, `up`/`down` for the streamer."""

    def __init__(self, shuttle: KVShuttle, cache, pos0: int, T: int):
        self.sh, self.cache, self.pos0, self.T = shuttle, cache, pos0, T
        self._slot: dict[int, int] = {}   # shuttled layer -> its KV slot in this pass (set by up)

    def layer(self, i: int):
        if i not in self.cache.host_layers:
            return self.cache.layer(i)
        return self.sh.views(self._slot[i], self.cache.n_alloc)

    def addressing(self, pos):
        return None, None, None          # slab layout (cuda/kv.py)

    def segments(self, T: int):
        return ((0, T, None),)

    def up(self, layer: int, slot: int, stream) -> int:
        """Enqueue on `stream` the upload of rows [0, pos0) of `layer` into KV slot `slot`; bytes."""
        sh, c, p0 = self.sh, self.cache, self.pos0
        if layer not in c.host_layers:
            return 0
        self._slot[layer] = slot
        tag = sh._tags[slot]
        sh._tags[slot] = (c.token, layer, p0 + self.T)      # valid after this pass's compute
        if p0 == 0 or (tag is not None and tag[:2] == (c.token, layer) and tag[2] >= p0):
            return 0
        k, v = sh.views(slot, c.n_alloc)
        sh.copy_rows(k, c.k[layer], 0, p0, stream)
        sh.copy_rows(v, c.v[layer], 0, p0, stream)
        n = 2 * sh.h * p0 * sh.hd * 2
        sh.bytes_up += n
        return n

    def down(self, layer: int, slot: int, stream) -> int:
        """Enqueue on `stream` the download of this pass's rows [pos0, pos0 + T) of `layer`."""
        sh, c = self.sh, self.cache
        if layer not in c.host_layers:
            return 0
        k, v = sh.views(slot, c.n_alloc)
        sh.copy_rows(c.k[layer], k, self.pos0, self.T, stream)
        sh.copy_rows(c.v[layer], v, self.pos0, self.T, stream)
        n = 2 * sh.h * self.T * sh.hd * 2
        sh.bytes_down += n
        return n


def pinned_f16(shape) -> np.ndarray:
    import cupyx
    return cupyx.empty_pinned(shape, dtype=np.float16)
