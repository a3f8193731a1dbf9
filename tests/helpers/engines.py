"""Engines on the real models, loaded once per test session and shared by every module that asks.

A session-scoped fixture defined in two test modules would load twice (pytest keys fixtures by where they
are defined); this cache keys them by file and settings instead. Engines are safe to share: requests are
serialised by the Engine's lock, and the KV-cache prefix reuse never changes results.
"""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def numpy_engine(path: Path, n_ctx: int = 256):
    from aircupy import Engine
    return Engine(path, backend="numpy", n_ctx=n_ctx)
