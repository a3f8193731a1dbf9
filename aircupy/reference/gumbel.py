"""Numpy twin of the GPU sampler's noise (cuda_src/sample.cu: gumbel_u), numpy only.

The device draws a token by Gumbel-max: argmax over the candidates of z_i - max z + g_i, with
g_i = -log(-log u_i) and u_i a counter-based hash of (seed, counter, token id) -- no RNG state on the
device beyond the per-row counter, which the kernel increments after each draw. The hash is splitmix64's
finaliser on (seed << 32 | counter) + (id + 1) * golden-ratio; u takes the top 24 bits, so it is exact in
float32 and lies in (0, 1). Tests rebuild the device's draws with this; a seed therefore reproduces the
tokens on the GPU backend (not the numpy backend's np.random.Generator stream).
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def gumbel_uniform(seed: int, counter: int, ids: np.ndarray) -> np.ndarray:
    """u_i in (0, 1), float32, for token ids `ids` at (seed, counter) -- bit-exact with the kernel."""
    ids = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(((int(seed) & 0xFFFFFFFF) << 32) | (int(counter) & 0xFFFFFFFF)) + (ids + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (((z >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)).astype(np.float32)


def gumbel_noise(seed: int, counter: int, ids: np.ndarray) -> np.ndarray:
    """g_i = -log(-log u_i), float32 (the device computes it with logf; compare with a tolerance)."""
    u = gumbel_uniform(seed, counter, ids)
    return -np.log(-np.log(u.astype(np.float64))).astype(np.float32)
