"""Prefill passes replayed as CUDA graphs, one per chunk length T, in a small LRU cache.

A resident prefill pass is ~25 launches per layer (linear = dequant + cast + cuBLAS GEMM [+ bias],
strided q/k/v copies, norms, rope, attention, ...), ~750 for a 30-layer model, each ~20-40 us of
Python: on a small model the GPU waits on the host (SmolLM2 pp512 was launch-bound at 0.38x llama.cpp).
Captured once per T, a pass is one graph launch. What a captured pass reads that changes between
calls travels through device memory: token ids and positions are copied from fixed pinned host
buffers by the graph's first nodes (the caller fills them), so full 512-token chunks of a long prompt,
at any position, all replay the one T = 512 graph. The KV pointers are the start-up (pooled) cache's,
so only passes on that cache are graphed; the head (2-3 launches) stays eager after the pass, which
lets one graph serve forward (last row or all rows) and forward_sample alike.

When a T is captured, always right after an eager run of it (which did the work of that call):
  - T == full_rows (a full chunk): at its first use. Full chunks recur (every chunk of a long prompt
    but the last; benchmarks' repeated pp512, whose warm-up thus captures), so the next use replays.
  - any other T: at its second use. A partial chunk's T is a prompt's length mod the chunk size,
    usually seen once; capturing at first sight would add a capture to most prompts' last chunk.
Each new graph is launched once at once, with the eager run's inputs still in place (same positions,
so it rewrites the same KV entries), and kept only if its output (`output(T)`: the pass's residual
rows) equals the eager run's bit for bit; otherwise the eager pass runs again (restoring the KV cache)
and graphs are turned off, with the reason. Eviction: at most `capacity` graphs, least recently used
dropped (cudaGraphExecDestroy frees a graph still in flight on completion). Lengths seen once hold no
graph and never evict one.

Capture safety: a pass must be launches only (ForwardPass never allocates or synchronizes); capture
runs with cupy's allocator replaced by one that raises (graphs.capture_graph(forbid_alloc=True)), so
a launcher that would allocate makes the capture fail instead of baking pool memory into the graph.
cuBLAS needs its handle and this stream's workspace to exist before capture, and cupy's wrappers
refuse to call it during a capture (ops.gemm goes through aircupy/cuda/cublas_capture.py then):
the eager run before every capture creates them. If a capture fails, graphs stay off (eager passes)
and `fallback_reason` says why; graphs captured and checked before remain in use.

Memory: a graph owns no buffers (its nodes point into the device pool and the pinned inputs); what
it costs beyond that (cudaGraphExec bookkeeping, and whatever cuBLAS reserves inside a capture) is
printed by tests/gpu/test_prefill_graphs.py (MEM line) and bench/bench_prefill_graphs.py.

Pure logic (the stream, the pass and the capture function are injected): tests/test_prefill_graphs.py
checks the policy on the CPU; tests/gpu/test_prefill_graphs.py checks replays == eager bit for bit.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import numpy as np

PREFILL_GRAPH_SLOTS = 4  # graphs kept: the full-chunk T plus a few recurring partial lengths


class LRU:
    """A bounded mapping that forgets its least recently used entry."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        """The value (now most recently used), or None."""
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key, value):
        """Insert as most recently used; returns the evicted (key, value) or None."""
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.capacity:
            return self._d.popitem(last=False)
        return None

    def keys(self) -> list:
        """Keys, least recently used first."""
        return list(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def clear(self) -> None:
        self._d.clear()


def _default_capture(step, stream):
    from aircupy.cuda.graphs import capture_graph
    return capture_graph(step, stream, forbid_alloc=True)


class PrefillGraphs:
    """Run the prefill pass of T tokens (`step(T)`: launches only, reading its inputs from device
    buffers the caller has filled) on `stream`, eagerly or as a replayed graph (policy: module doc)."""

    def __init__(self, step: Callable[[int], None], stream, *, full_rows: int,
                 output: Callable[[int], np.ndarray], capacity: int = PREFILL_GRAPH_SLOTS,
                 capture: Callable | None = None):
        """output(T): a host copy of what the pass over T tokens produced (waits for it)."""
        self.step, self.stream, self.full_rows, self.output = step, stream, int(full_rows), output
        self.graphs = LRU(capacity)
        self._capture_fn = capture or _default_capture
        self._seen: set[int] = set()   # lengths run at least once (<= full_rows ints)
        self.enabled = True
        self.fallback_reason: str | None = None
        self.eager_runs = self.captures = self.replays = self.evictions = 0

    def launch(self, T: int) -> None:
        """Enqueue the pass over T tokens on the stream (no host synchronization on a replay)."""
        g = self.graphs.get(T)
        if g is not None:
            g.launch(self.stream)
            self.replays += 1
            return
        self._eager(T)
        due = self.enabled and (T == self.full_rows or T in self._seen)
        self._seen.add(T)
        if due:
            self._capture_checked(T)

    def _eager(self, T: int) -> None:
        with self.stream:
            self.step(T)
        self.eager_runs += 1

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.fallback_reason = reason

    def _capture_checked(self, T: int) -> None:
        """Capture the pass just run eagerly; keep the graph if one launch reproduces it exactly."""
        ref = self.output(T)
        try:
            graph = self._capture_fn(partial(self.step, T), self.stream)
        except Exception as e:  # stay correct: eager from now on, and say why
            self._disable(f"capture of T={T} failed: {type(e).__name__}: {e}")
            return
        try:
            graph.launch(self.stream)
            got = self.output(T)
        except Exception as e:
            self._eager(T)
            self._disable(f"the graph of T={T} failed to run: {type(e).__name__}: {e}")
            return
        if not np.array_equal(ref, got, equal_nan=True):
            self._eager(T)  # the launch rewrote this pass's KV entries: put the eager values back
            diff = np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))
            self._disable(f"the graph of T={T} differs from the eager pass (max |diff| "
                          f"{np.nanmax(diff):.3g})")
            return
        self.captures += 1
        if self.graphs.put(T, graph) is not None:
            self.evictions += 1

    def report(self) -> str:
        state = (f"off ({self.fallback_reason})" if self.fallback_reason
                 else f"{len(self.graphs)} held (T = {', '.join(map(str, self.graphs.keys())) or '-'})")
        return (f"prefill graphs {state}: {self.captures} captures, {self.replays} replays, "
                f"{self.evictions} evictions, {self.eager_runs} eager passes")
