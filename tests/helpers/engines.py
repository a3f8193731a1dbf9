"""Engines on the real models, loaded once per test session and shared by every module that asks.

A session-scoped fixture defined in two test modules would load twice (pytest keys fixtures by where they
are defined); this cache keys them by file and settings instead. Engines are safe to share: requests from
any thread run through the engine's runner, and the prefix cache never changes results. Their KV pool
is kept small (16 contexts) so the session's engines stay light in RAM.

with_batching(engine, ...) is a second Engine over the same loaded weights and tokenizer with its own
runner (other batching limits, or a wrapped model): no reload; stop it with .close_runner().
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

from aircupy.engine.batching import BatchLimits, plan_kv


@functools.cache
def numpy_engine(path: Path, n_ctx: int = 256):
    from aircupy import Engine
    return Engine(path, backend="numpy", n_ctx=n_ctx, kv_cache_tokens=16 * n_ctx)


def with_batching(engine, model=None, max_num_seqs: int = 64, max_batched_tokens: int | None = None,
                  kv_cache_tokens: int | None = None, n_ctx: int | None = None):
    """n_ctx: a smaller context for the sibling (the numpy model holds nothing sized by it)."""
    e = copy.copy(engine)
    if model is not None:
        e.model = model
    if n_ctx is not None:
        e.n_ctx = n_ctx
    limits = BatchLimits.check(max_num_seqs, max_batched_tokens, kv_cache_tokens or 16 * e.n_ctx, e.n_ctx)
    e.kv_plan = plan_kv(e.model.kv_spec(), limits, e.n_ctx, e.config.kv_cache_bytes(1, 4), None)
    e._start_runner()
    e.close_runner = e._finalizer      # stops the runner only: the model is the original engine's
    return e
