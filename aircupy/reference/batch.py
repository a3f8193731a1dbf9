"""One continuous-batching step for the numpy model: the step's arrays checked, and paged attention.

A step (the scheduler's Step.arrays(), plain int32 arrays) holds S chunks, N rows in chunk order:

    input_ids, positions, slot_mapping (N,)   query_start (S + 1,)   context_lens (S,)
    block_tables (S, W), -1 padded            logits_rows (R,)

Chunk s is rows [query_start[s], query_start[s + 1]) at positions [start, context_lens[s]), start =
context_lens[s] - n; the KV of [0, start) is in the pool through block_tables[s]. NumpyModel.forward_step
runs every layer's projections over all N rows at once (one matmul: the weights are read once for the
whole batch) and hands each layer's attention to the function attend_fn() builds here:

  1. write: every row's k and v at its slot_mapping slot, all rows before any attention, so a chunk
     may read blocks that an earlier chunk of the same step writes (shared prompt prefixes);
  2. attend: gather each chunk's keys of positions [lo, context_len) through its block table; row j
     (position start + j) attends causally to [0, start + j], and on a sliding-window layer to the
     last `window` of those (lo = start - window + 1 skips the blocks no row of the chunk can see).
     A chunk of several rows (a prompt) runs ops.attention, exactly as forward() does; the one-row
     chunks (decode rows, most of a busy step) run together in one ops.attention_rows call over keys
     padded to the longest context, since a Python call per row per layer would cost more than the
     row's arithmetic. Both share ops' one softmax formula (scale, softcap, mask), so the batched and
     the solo paths differ only in where the keys come from.
A mixture-of-experts layer needs nothing here: its router and experts act on each row alone
(reference/moe.py groups the step's rows by expert), so a batched step routes exactly as solo runs do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.errors import InvalidParameterError
from aircupy.reference import ops as ref
from aircupy.reference.paged_kv import PagedKVCache

_KEYS = ("input_ids", "positions", "slot_mapping", "query_start", "context_lens", "block_tables", "logits_rows")


@dataclass(frozen=True)
class StepArrays:
    """A step's arrays as int64, checked against each other and against the pool (see check())."""

    input_ids: np.ndarray       # (N,)
    positions: np.ndarray       # (N,)
    slot_mapping: np.ndarray    # (N,)
    query_start: np.ndarray     # (S + 1,)
    context_lens: np.ndarray    # (S,)
    block_tables: np.ndarray    # (S, W)
    logits_rows: np.ndarray     # (R,)

    @property
    def num_chunks(self) -> int:
        return len(self.context_lens)

    @classmethod
    def check(cls, arrays: dict, kv: PagedKVCache, vocab_size: int) -> "StepArrays":
        """Convert and validate: chunks of >= 1 row that tile [0, N); each chunk's positions end at its
        context length; its block table covers that length with blocks of the pool; every row's slot is
        its position's slot in that table. Raises InvalidParameterError naming the array at fault."""
        missing = [k for k in _KEYS if k not in arrays]
        if missing:
            raise InvalidParameterError("arrays", f"a step needs {', '.join(missing)}")
        a = {k: np.asarray(arrays[k]).astype(np.int64, copy=False) for k in _KEYS}
        ids, pos, slots, qs, ctx, tables, rows = (a[k] for k in _KEYS)
        N, S, B = len(ids), len(ctx), kv.block_size

        def need(ok, name, what):
            if not ok:
                raise InvalidParameterError(name, what)

        need(N >= 1 and ids.ndim == pos.ndim == slots.ndim == 1 and len(pos) == len(slots) == N,
             "input_ids", f"need N >= 1 rows with as many positions and slots, got {ids.shape}, {pos.shape}, {slots.shape}")
        need(((ids >= 0) & (ids < vocab_size)).all(), "input_ids", f"token id out of range [0, {vocab_size})")
        lens = np.diff(qs)
        need(qs.shape == (S + 1,) and S >= 1 and qs[0] == 0 and qs[-1] == N and (lens >= 1).all(),
             "query_start", f"must split the {N} rows into chunks of >= 1 row, one per context length")
        need((ctx >= lens).all(), "context_lens", "a chunk's context length is below its row count")
        need(tables.ndim == 2 and len(tables) == S and tables.shape[1] * B >= ctx.max(), "block_tables",
             f"need ({S}, >= {-(-int(ctx.max()) // B)}) block ids, got {tables.shape}")
        covered = np.arange(tables.shape[1])[None, :] < -(-ctx[:, None] // B)
        need(((tables >= 0) & (tables < kv.num_blocks))[covered].all(), "block_tables",
             f"block ids must be in [0, {kv.num_blocks}) up to each context length")
        seg = np.repeat(np.arange(S), lens)                    # chunk of each row
        want = ctx[seg] - lens[seg] + (np.arange(N) - qs[seg])  # position of each row
        need((pos == want).all(), "positions", "each chunk's positions must be [context_len - n, context_len)")
        need((slots == tables[seg, pos // B] * B + pos % B).all(), "slot_mapping",
             "a row's slot must be its position's slot in its chunk's block table")
        need(rows.ndim == 1 and ((rows >= 0) & (rows < N)).all(), "logits_rows", f"rows must be in [0, {N})")
        return cls(ids, pos, slots, qs, ctx, tables, rows)

    def attend_fn(self, config, kv: PagedKVCache):
        """attend(i, q (N, H, D), k (N, Hkv, D), v (N, Hkv, Dv)) -> (N, H * Dv) for layer i: writes
        the step's k/v into the pool, then runs the attention of every one-row chunk (decode rows) in
        one ops.attention_rows call and each longer chunk with ops.attention over its gathered keys."""
        plans = {}  # window -> _Plan: layers with the same window read the same slots

        def attend(i, q, k, v):
            kv.write(i, self.slot_mapping, k, v)
            window = config.layer_window(i)
            if window not in plans:
                plans[window] = self._plan(window, kv.block_size)
            p = plans[window]
            out = np.empty((q.shape[0], q.shape[1] * kv.head_dim_v), np.float32)
            if len(p.rows):
                keys, values = kv.gather_rows(i, p.slots)
                out[p.rows] = ref.attention_rows(q[p.rows], keys, values, self.positions[p.rows], p.k_pos,
                                                 config.attn_scale, window=window, softcap_value=config.attn_softcap)
            for s, lo in p.chunks:
                r0, r1, hi = self.query_start[s], self.query_start[s + 1], int(self.context_lens[s])
                keys, values = kv.gather(i, self.block_tables[s], lo, hi)
                out[r0:r1] = ref.attention(q[r0:r1], keys, values, self.positions[r0:r1], np.arange(lo, hi),
                                           config.attn_scale, window=window, softcap_value=config.attn_softcap)
            return out

        return attend

    def _plan(self, window: int | None, B: int) -> "_Plan":
        """Which keys each chunk reads on a layer with this window: positions [lo, context_len), lo =
        start - window + 1 (or 0), the first key any of its rows can see. One-row chunks are padded to
        the longest of them: slots (n, S) (padding repeats the row's first slot) and k_pos (n, S), -1
        for padding."""
        lens = np.diff(self.query_start)
        starts = self.context_lens - lens
        los = np.zeros_like(starts) if window is None else np.maximum(0, starts - window + 1)
        one = np.flatnonzero(lens == 1)
        chunks = [(int(s), int(los[s])) for s in np.flatnonzero(lens > 1)]
        if not len(one):
            return _Plan(one, np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), chunks)
        lo, hi = los[one][:, None], self.context_lens[one][:, None]
        pos = lo + np.arange(int((hi - lo).max()))[None, :]       # (n, S)
        valid = pos < hi
        pos = np.where(valid, pos, lo)
        slots = self.block_tables[one[:, None], pos // B] * B + pos % B
        return _Plan(self.query_start[one], slots, np.where(valid, pos, -1), chunks)


@dataclass(frozen=True)
class _Plan:
    rows: np.ndarray                  # (n,) rows of the one-row chunks
    slots: np.ndarray                 # (n, S) their keys' slots, padded
    k_pos: np.ndarray                 # (n, S) their keys' positions, -1 = padding
    chunks: list[tuple[int, int]]     # (chunk, lo) of the longer chunks: keys [lo, context_len)
