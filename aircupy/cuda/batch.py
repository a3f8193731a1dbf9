"""Continuous-batching steps on the GPU: one forward pass for every scheduled sequence.

    kv = model.new_kv_pool(num_blocks, block_size)        # the pool's paged KV (cuda/kv.py PagedKV)
    ids, logits = model.forward_step_sample(step.arrays(), kv, samplers)

A step (engine/step.py: N rows in chunk order, S chunks, R logits rows) runs as:
  1. upload: the step's inputs in one pinned copy (buffers.StepLayout): per row its id, position,
     slot and chunk index; the chunks' block tables; per logits row its row index, rng and
     sampling parameters;
  2. the layers over all N rows (cuda/forward.py with a StepKV): every row's K/V is stored at its slot
     before the layer's attention; the decode rows (and chunks of <= 8 rows) share one decode-kernel
     launch, each longer chunk gets the tiled prefill kernel (kv.attention_segments);
  3. the logits rows gathered into a compact (R, E) block, the head over them in groups of HEAD_ROWS
     (the matvec path), and per group: a row with a device sampler is sampled on the GPU (sample.cu,
     its own seed and counter: the same draw it would get alone), a row without one has its logits
     copied to the host;
  4. one download of the R sampled ids.
Pure decode steps (every chunk one row, every logits row device-sampled) of a bucketed row count are
replayed as CUDA graphs (DecodeGraphs): rows past the step's count are padding (slot -1: nothing is
stored; they attend one key of table 0 and their ids are ignored).

The numpy twin is reference/model.NumpyModel.forward_step (reference/batch.py).
"""
from __future__ import annotations

import numpy as np

from aircupy.cuda.buffers import StepLayout
from aircupy.cuda.kv import PagedKV, StepKV, attention_segments
from aircupy.errors import InvalidParameterError

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket(n: int, limit: int) -> int | None:
    """The smallest decode-graph row count >= n within limit, or None."""
    return next((b for b in DECODE_BUCKETS if n <= b <= limit), None)


class StepRunner:
    """The model's batch steps (see the module docstring); owns the pinned mirror of the step buffer."""

    def __init__(self, model, use_graphs: bool):
        from aircupy.cuda.graphs import PinnedIO
        self.m = m = model
        fp = m.fp
        self.layout = StepLayout(m.rows, fp.max_seqs, fp.max_blocks)
        self.io = PinnedIO(m.buf.step)
        self.dev = self.layout.views(m.buf.step)
        self.host = self.layout.views(self.io.host)
        self.ids_out = PinnedIO(m.buf.token[:fp.max_seqs])
        self.use_graphs = use_graphs
        self.graphs: dict[int, object] = {}      # decode rows bucket -> StepGraph
        self.steps = self.graph_steps = 0

    # -- inputs ---------------------------------------------------------------------------------------
    def _fill(self, a, samplers) -> tuple[int, int, int]:
        """Write the checked step `a` into the pinned mirror; (N, S, R)."""
        h, lay = self.host, self.layout
        N, S, R = len(a.input_ids), a.num_chunks, len(a.logits_rows)
        W = a.block_tables.shape[1]
        if N > lay.rows or S > lay.seqs or W > lay.max_blocks:
            raise InvalidParameterError("arrays", f"a step of {N} rows, {S} sequences and {W}-block tables "
                                                  f"exceeds the model's {lay.rows} rows, {lay.seqs} sequences, "
                                                  f"{lay.max_blocks} blocks (max_batched_tokens, max_num_seqs, "
                                                  f"n_ctx at load)")
        h["ids"][:N] = a.input_ids
        h["pos"][:N] = a.positions
        h["slots"][:N] = a.slot_mapping
        h["seq"][:N] = np.repeat(np.arange(S), np.diff(a.query_start))
        h["tables"][:S, :W] = a.block_tables
        h["lrows"][:R] = a.logits_rows
        for i, s in enumerate(samplers):
            if s is not None:
                p = s.params
                h["rng"][i] = (s.seed, s.counter & 0xFFFFFFFF)
                h["sparams"][i] = (p.temperature, p.top_k, p.top_p, p.min_p)
            else:
                h["rng"][i] = 0
                h["sparams"][i] = (0.0, 0, 1.0, 0.0)
        return N, S, R

    def _pad(self, N: int, B: int) -> None:
        """Rows [N, B) of a decode graph: no KV store, one key of table 0, id 0."""
        h = self.host
        h["ids"][N:B] = 0
        h["pos"][N:B] = 0
        h["slots"][N:B] = -1
        h["seq"][N:B] = 0
        h["lrows"][N:B] = np.arange(N, B)
        h["rng"][N:B] = 0
        h["sparams"][N:B] = (0.0, 0, 1.0, 0.0)

    # -- the pass -------------------------------------------------------------------------------------
    def _launch(self, kv: PagedKV, N: int, R: int, segments, device_rows, host_rows, logits_out) -> None:
        """Launches (and the copies) of one step on the model's stream; see the module docstring.
        device_rows / host_rows: per HEAD_ROWS group, whether it samples / copies logits."""
        from aircupy.cuda import ops
        m, d, b = self.m, self.dev, self.m.buf
        self.io.upload(m.stream)
        skv = StepKV(kv, d["slots"][:N], d["seq"][:N], d["tables"], segments)
        m.fwd.run(d["ids"][:N], d["pos"][:N], N, skv)
        ops.take_rows(m.lib, b.x[:N], d["lrows"][:R], b.h[:R])
        hr = b.logits.shape[0]
        for g, r0 in enumerate(range(0, R, hr)):
            r1 = min(R, r0 + hr)
            out = m.fwd.head(r0, r1, src=b.h)
            if device_rows[g]:
                ops.sample(m.lib, out, d["sparams"][r0:r1], d["rng"][r0:r1], b.token[r0:r1])
            if host_rows[g]:
                out.get(stream=m.stream, out=logits_out[r0:r1])
        self.ids_out.download(m.stream)

    def run(self, arrays: dict, kv, samplers) -> tuple[np.ndarray, np.ndarray | None]:
        from aircupy.reference.batch import StepArrays
        m = self.m
        if not isinstance(kv, PagedKV) or kv is not m.paged:
            raise InvalidParameterError("kv", f"{kv!r} is not this model's pool (new_kv_pool makes one)")
        a = StepArrays.check(arrays, kv, m.config.vocab_size)
        R = len(a.logits_rows)
        samplers = list(samplers) if samplers is not None else [None] * R
        if len(samplers) != R:
            raise InvalidParameterError("samplers", f"one per logits row ({R}), got {len(samplers)}")
        m.stream.synchronize()          # the pinned mirror may still feed the previous step's copy
        N, S, _ = self._fill(a, samplers)
        self.steps += 1
        hr = m.buf.logits.shape[0]
        host = [s is None for s in samplers]
        decode = N == S == R and not any(host)
        B = bucket(N, min(self.layout.rows, self.layout.seqs)) if decode and self.use_graphs else None
        if B is not None:
            self._pad(N, B)
            self._graph(kv, B).launch()
            self.graph_steps += 1
            m.stream.synchronize()
            self._advance(samplers)
            return self.ids_out.host[:N].copy(), None
        groups = range(0, R, hr)
        device_rows = [not all(host[r0:r0 + hr]) for r0 in groups]
        host_rows = [any(host[r0:r0 + hr]) for r0 in groups]
        logits = np.empty((R, m.config.vocab_size), np.float32) if any(host) else None
        segments = attention_segments(a.query_start, _decode_max_rows())
        with m.stream:
            self._launch(kv, N, R, segments, device_rows, host_rows, logits)
        m.stream.synchronize()
        ids = self.ids_out.host[:R].copy()
        ids[np.asarray(host, dtype=bool)] = -1
        self._advance(samplers)
        return ids, logits

    @staticmethod
    def _advance(samplers) -> None:
        """One draw per sampled row: the next token of that sequence uses the next counter."""
        for s in samplers:
            if s is not None:
                s.counter += 1

    def _graph(self, kv: PagedKV, B: int):
        from aircupy.cuda.graphs import StepGraph
        g = self.graphs.get(B)
        if g is None:
            groups = range(0, B, self.m.buf.logits.shape[0])
            seg = [(0, B, "decode")]
            g = StepGraph(lambda: self._launch(kv, B, B, seg, [True] * len(groups), [False] * len(groups),
                                               None), self.m.stream, True)
            self.graphs[B] = g
        return g

    def report(self) -> str:
        captured = sorted(b for b, g in self.graphs.items() if g.graph is not None)
        failed = [g.fallback_reason for g in self.graphs.values() if g.fallback_reason]
        s = f"batch steps {self.steps} ({self.graph_steps} replayed; decode graphs for {captured} rows)"
        return s + (f"; {failed[0]}" if failed else "")


def _decode_max_rows() -> int:
    from aircupy.cuda.ops.layers import DECODE_MAX_ROWS
    return DECODE_MAX_ROWS


class _OneBlock:
    """The block geometry a shuttled model's steps are checked against: one block of n_ctx tokens."""

    def __init__(self, n_ctx: int):
        self.block_size, self.num_blocks = n_ctx, 1


def shuttle_step(model, arrays: dict, cache, samplers) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch step of a model with the KV shuttle (kv_spec: one sequence, one n_ctx block, so a
    slot is a position): the chunk runs as a single-sequence pass on `cache` (new_kv_pool's), whose
    valid length is the chunk's start, as the scheduler's block table says."""
    from aircupy.cuda.shuttle import ShuttleKVCache
    from aircupy.reference.batch import StepArrays
    if not isinstance(cache, ShuttleKVCache):
        raise InvalidParameterError("kv", "a model with the KV shuttle steps on its new_kv_pool() cache")
    a = StepArrays.check(arrays, _OneBlock(model.n_ctx), model.config.vocab_size)
    N, R = len(a.input_ids), len(a.logits_rows)
    if a.num_chunks != 1 or R > 1 or (R == 1 and a.logits_rows[0] != N - 1):
        raise InvalidParameterError("arrays", "a model with the KV shuttle runs one sequence per step "
                                              "(kv_spec()['max_num_seqs'] == 1)")
    samplers = list(samplers) if samplers is not None else [None] * R
    cache.length = int(a.positions[0])
    if R == 0:
        model.forward(a.input_ids, a.positions, cache)
        return np.empty(0, np.int32), None
    if samplers[0] is not None:
        tok = model.forward_sample(a.input_ids, a.positions, cache, samplers[0])
        return np.array([tok], np.int32), None
    return np.array([-1], np.int32), model.forward(a.input_ids, a.positions, cache)
