"""Shared helpers of the kernel tests (GPU tier): the library fixture's factory and error measures."""
from __future__ import annotations

import numpy as np


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN anywhere -> inf)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (den if den > 0 else 1.0))


def poison(cp, shape, dtype=np.float32):
    """A device array filled with NaN (or 0xFF bytes): outputs a kernel forgets to write stay visible."""
    a = cp.empty(shape, dtype=dtype)
    if np.dtype(dtype).kind == "f":
        a.fill(np.nan)
    else:
        a.view(np.uint8).fill(0xFF)
    return a
