"""CudaModel: the resident GPU model, same interface as NumpyModel plus device-side sampling.

    model = CudaModel(g, config, n_ctx, vram_budget=None)
    cache = model.new_cache(n_ctx)
    logits = model.forward(ids (T,), positions (T,), cache, all_logits=False)  # like NumpyModel
    token = model.forward_sample(ids, positions, cache, params)                # only the id crosses

Start-up plans one device pool (aircupy/device/pool.py): every layer's weights as one block
(cuda_layout.py), the globals, one KV cache of n_ctx tokens, activations for PREFILL_ROWS rows and
one shared scratch; a model that does not fit raises ModelTooLargeError before anything is allocated.
Prefill runs in chunks of PREFILL_ROWS tokens; a single-token step on the start-up cache replays a
CUDA graph (aircupy/device/graphs.py), and so does a prefill chunk of T >= 2 tokens on that cache once
its T has a captured graph (aircupy/model/cuda_prefill.py: an LRU of PREFILL_GRAPH_SLOTS graphs keyed
by T). positions must continue the cache: cache.length + arange(T).
"""
from __future__ import annotations

import inspect
import weakref

import numpy as np

from aircupy.cuda.pool import DevicePool, PoolPlan, fmt_bytes
from aircupy.errors import ContextLengthError, InvalidParameterError, UnsupportedModelError
from aircupy.gguf.ggml import SUPPORTED_COMPUTE
from aircupy.gguf.arch import tensor_map
from aircupy.cuda.buffers import plan_buffers, make_buffers, scratch_nbytes
from aircupy.cuda.forward import HEAD_ROWS, ForwardPass
from aircupy.cuda.layout import global_layout, layer_layout
from aircupy.cuda.prefill import PREFILL_GRAPH_SLOTS, PrefillGraphs
from aircupy.cuda.sampling import DeviceSampler, DeviceSampling
from aircupy.cuda.weights import bind
from aircupy.cuda.load import load_blocks, plan_load, start_read_ahead

PREFILL_ROWS = 512  # tokens per prefill launch sequence (the engine feeds 512-token chunks too)


class CudaKVCache:
    """One sequence's keys/values: per layer float16 (1, Hkv, n_alloc, D) for k and for v."""

    def __init__(self, k, v, n_ctx: int, pooled: bool):
        self.k, self.v = k, v
        self.n_ctx = n_ctx
        self.pooled = pooled  # lives in the start-up pool (the graph-captured cache)
        self.length = 0

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n  # later writes overwrite; attention never reads past pos[t]


def _check_supported(c, layouts) -> None:
    from aircupy.cuda.ops.layers import HEAD_DIMS
    if c.head_dim not in HEAD_DIMS:
        raise UnsupportedModelError(f"{c.arch}: head size {c.head_dim} has no CUDA attention kernel "
                                    f"(sizes {', '.join(map(str, HEAD_DIMS))}); use --backend numpy")
    if c.head_dim_v != c.head_dim:
        raise UnsupportedModelError(f"{c.arch}: value head size {c.head_dim_v} != key head size "
                                    f"{c.head_dim} is not supported by the CUDA backend")
    for lay in layouts:
        for p in lay.matrices():
            if p.ggml_type not in SUPPORTED_COMPUTE:
                raise UnsupportedModelError(f"tensor {p.sources[0][0]!r} has type "
                                            f"{p.ggml_type.name}, which the CUDA kernels lack")


def _warm_cublas(ops, lib, c, layer_ls, scratch, stream) -> None:
    """cuBLAS's first-use costs now, while the disk is the bound (cold start, issue 5), not at the
    first prompt: a GEMM per layer matrix shape that prefill gives to cuBLAS, on `scratch` (the
    load's device staging; `stream` orders them before the load's copies into it)."""
    from aircupy.cuda.ops.gemm_choice import prefill_path
    rows = 16
    shapes = {p.shape for lay in layer_ls for p in lay.matrices()
              if prefill_path(p.ggml_type.name, p.shape[0], p.shape[1], rows) == "cublas"}
    ops.warm_gemm(lib, shapes, scratch, half="bf16" if c.arch == "gemma3" else "f16", rows=rows,
                  stream=stream)


class CudaModel:
    # Graph-replayed prefill (PrefillGraphs) or None: eager. A class attribute so that subclasses
    # with their own constructor (StreamedCudaModel: weights move between passes) stay eager.
    prefill_graphs: PrefillGraphs | None = None

    def __init__(self, g, config, n_ctx: int, vram_budget: int | None = None, progress=None, *,
                 use_graphs: bool = True, prefill_rows: int = PREFILL_ROWS, lib=None,
                 prefill_graph_slots: int = PREFILL_GRAPH_SLOTS, read_ahead=1):
        """lib: a KernelLibrary to share between models in one process (compiles once).
        use_graphs: replay decode steps and prefill chunks as CUDA graphs (on the start-up KV cache);
        prefill_graph_slots: how many prefill graphs (one per chunk length) to keep, 0 = none.
        read_ahead: reader threads of the cold-start page-cache warmer, 0 for none, or a
        ReadAhead the caller started (staged_fill.start_read_ahead); the model closes it once
        the weights are in, but not when it raises before reading (ModelTooLargeError)."""
        import cupy as cp
        from aircupy.cuda.kernels import KernelLibrary
        from aircupy.cuda import ops

        report = progress or (lambda stage: None)
        c = self.config = config
        if n_ctx < 1:
            raise InvalidParameterError("n_ctx", f"must be positive, got {n_ctx}")
        self.n_ctx, self.rows = int(n_ctx), int(prefill_rows)
        tm = tensor_map(c.arch, c.n_layers, g.tensors)
        stack = "row0" in inspect.signature(ops.repack).parameters
        glob_l = global_layout(tm.globals, g.tensors)
        layer_ls = [layer_layout(tm.layers[i], g.tensors, stack) for i in range(c.n_layers)]
        _check_supported(c, [glob_l] + layer_ls)

        plan = PoolPlan()
        plan.add("weights.globals", glob_l.nbytes, "weights")
        for i, lay in enumerate(layer_ls):
            plan.add(f"weights.layer{i}", lay.nbytes, "weights")
        kv_layer = c.n_head_kv * self.n_ctx * c.head_dim * 2  # float16 bytes, one of k or v
        plan.add("kv", 2 * c.n_layers * kv_layer, "kv")
        plan_buffers(plan, c, self.rows, HEAD_ROWS)
        plan.add("scratch", scratch_nbytes(ops, c, [glob_l] + layer_ls, g.tensors, self.rows,
                                           HEAD_ROWS), "scratch")
        # Cold start (issue 5): the disk starts reading now, while the CUDA context, the pool and
        # the kernels are set up; load_blocks closes the warmer.
        load = plan_load([glob_l] + layer_ls, g.tensors, g.file_size)
        warmer = self.warmer = start_read_ahead(g.path, load.ranges, read_ahead)
        try:
            self.pool = DevicePool(plan, vram_budget, what=f"{g.path.name} ({c.arch})")
        except BaseException:
            if warmer is not None and warmer is not read_ahead:   # a caller's stays theirs
                warmer.close()
            raise

        self.lib = lib if lib is not None else KernelLibrary()
        # NVRTC / cubin load on a thread while the disk reads; warmup() below waits for it (and
        # compiles on this thread if that failed, raising the real error).
        self.lib.warmup_async()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.buf = make_buffers(self.pool, c, self.rows, HEAD_ROWS)
        staging = self.pool.array("scratch", plan.regions["scratch"].nbytes, np.uint8)
        blocks = [self.pool.array("weights.globals", glob_l.nbytes, np.uint8)] + \
                 [self.pool.array(f"weights.layer{i}", lay.nbytes, np.uint8)
                  for i, lay in enumerate(layer_ls)]
        _warm_cublas(ops, self.lib, c, layer_ls, staging, self.stream)
        report("uploading weights to the GPU")
        self.bytes_read = load_blocks(load, g.path, blocks, staging, self.lib, self.stream, warmer)
        self.glob = bind(glob_l, blocks[0])
        self.layers = [bind(lay, blocks[i + 1]) for i, lay in enumerate(layer_ls)]
        self.layouts = layer_ls
        self.weight_bytes = sum(lay.nbytes for lay in layer_ls) + glob_l.nbytes

        kv = self.pool.array("kv", (2, c.n_layers, 1, c.n_head_kv, self.n_ctx, c.head_dim),
                             np.float16)
        self._kv_pool = (list(kv[0]), list(kv[1]))
        self._pool_cache = None  # weakref to the cache object that holds the pooled KV
        self.extra_kv_bytes = 0

        report("compiling GPU kernels")
        self.lib.warmup()
        self.fwd = ForwardPass(self.lib, c, self.glob, self.layers, self.buf)
        self.sampling = DeviceSampling(self, use_graphs)
        if use_graphs and prefill_graph_slots > 0:
            self._enable_prefill_graphs(prefill_graph_slots)
        self.stream.synchronize()

    def _enable_prefill_graphs(self, slots: int) -> None:
        """Pinned inputs of graphed prefill chunks: ids and positions (rows,) int32, copied to
        buf.ids / buf.pos by the pass itself (PinnedIO: memcpy nodes in the graph)."""
        from aircupy.cuda.graphs import PinnedIO
        self._prefill_in = (PinnedIO(self.buf.ids), PinnedIO(self.buf.pos))
        self._prefill_kv = CudaKVCache(*self._kv_pool, self.n_ctx, pooled=True)  # the graphs' KV
        self.prefill_graphs = PrefillGraphs(self._prefill_pass, self.stream, full_rows=self.rows,
                                            output=self._prefill_output, capacity=slots)

    def _prefill_pass(self, T: int) -> None:
        """The captured unit: upload the pinned ids/positions, embed, every layer (launches only)."""
        for io in self._prefill_in:
            io.upload(self.stream)
        self.fwd.run(self.buf.ids[:T], self.buf.pos[:T], T, self._prefill_kv)

    def _prefill_output(self, T: int) -> np.ndarray:
        """The residual rows (T, E) a pass left: every logit derives from them (capture check)."""
        self.stream.synchronize()
        return self.buf.x[:T].get(stream=self.stream)

    # -- interface shared with NumpyModel ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, n_ctx: int) -> CudaKVCache:
        """The start-up KV cache when it is free and large enough; otherwise a new allocation
        outside the pool (set-up time only, never in the forward pass)."""
        import cupy as cp
        c = self.config
        if n_ctx < 1:
            raise InvalidParameterError("n_ctx", f"must be positive, got {n_ctx}")
        held = self._pool_cache() if self._pool_cache is not None else None
        if held is None and n_ctx <= self.n_ctx:
            cache = CudaKVCache(*self._kv_pool, n_ctx, pooled=True)
            self._pool_cache = weakref.ref(cache)
            return cache
        shape = (c.n_layers, 1, c.n_head_kv, n_ctx, c.head_dim)
        k, v = cp.empty(shape, cp.float16), cp.empty(shape, cp.float16)
        self.extra_kv_bytes += 2 * k.nbytes
        return CudaKVCache(list(k), list(v), n_ctx, pooled=False)

    def check_step(self, token_ids, positions, cache) -> tuple[np.ndarray, np.ndarray]:
        """Validated int32 copies of ids and positions (the errors NumpyModel raises, plus: the
        positions must be cache.length + arange(T), the slots the tokens are written to)."""
        ids = np.asarray(token_ids).reshape(-1)
        pos = np.asarray(positions).reshape(-1)
        T = ids.shape[0]
        if T == 0 or pos.shape[0] != T:
            raise InvalidParameterError("token_ids", f"need T >= 1 ids with T positions, got {T} "
                                                     f"and {pos.shape[0]}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidParameterError("token_ids", f"token id out of range [0, "
                                                     f"{self.config.vocab_size})")
        if cache.length + T > cache.n_ctx:
            raise ContextLengthError(f"{cache.length} cached + {T} new tokens exceed the cache size "
                                     f"of {cache.n_ctx}")
        if not np.array_equal(pos, np.arange(cache.length, cache.length + T)):
            raise InvalidParameterError("positions", f"must continue the cache: {cache.length} .. "
                                                     f"{cache.length + T - 1}")
        return ids.astype(np.int32), pos.astype(np.int32)

    def forward(self, token_ids, positions, cache: CudaKVCache, all_logits: bool = False):
        """float32 logits (T, vocab) if all_logits else (1, vocab), on the host."""
        ids, pos = self.check_step(token_ids, positions, cache)
        if len(ids) == 1 and cache.pooled:
            logits = self.sampling.decode_logits(ids[0], pos[0])
            cache.length += 1
            return logits
        T, V = len(ids), self.config.vocab_size
        out = np.empty((T if all_logits else 1, V), dtype=np.float32)
        with self.stream:
            for c0 in range(0, T, self.rows):
                n = self.prefill_chunk(ids[c0:c0 + self.rows], pos[c0:c0 + self.rows], cache)
                rows = range(0, n, HEAD_ROWS) if all_logits else ([n - 1] if c0 + n == T else [])
                for r0 in rows:
                    r1 = min(n, r0 + HEAD_ROWS) if all_logits else n
                    lg = self.fwd.head(r0, r1).get(stream=self.stream)
                    self.stream.synchronize()
                    if all_logits:
                        out[c0 + r0:c0 + r1] = lg
                    else:
                        out[0] = lg[-1]
        cache.length += T
        return out

    def prefill_chunk(self, ids: np.ndarray, pos: np.ndarray, cache) -> int:
        """Upload ≤ PREFILL_ROWS ids/positions (stream-ordered) and run every layer on them."""
        n = len(ids)
        if self.prefill_graphs is not None and cache.pooled and n > 1:
            # The pinned inputs are read when the pass's first nodes run: wait until the previous
            # chunk's pass (if still queued) has read them before overwriting.
            self.stream.synchronize()
            self._prefill_in[0].host[:n] = ids
            self._prefill_in[1].host[:n] = pos
            self.prefill_graphs.launch(n)
            return n
        self.buf.ids[:n].set(ids, stream=self.stream)
        self.buf.pos[:n].set(pos, stream=self.stream)
        self.fwd.run(self.buf.ids[:n], self.buf.pos[:n], n, cache)
        return n

    def new_sampler(self, params) -> DeviceSampler:
        """Device-sampling state of one request (SamplingParams); check `.supported` first."""
        return DeviceSampler(params)

    def forward_sample(self, token_ids, positions, cache: CudaKVCache, sampler: DeviceSampler) -> int:
        """Run the tokens and sample the next one on the device (temperature 0 = argmax); only
        the id crosses to the host."""
        return self.sampling.forward_sample(token_ids, positions, cache, sampler)

    def allocation_report(self) -> str:
        """What was allocated on the GPU and for what (one line)."""
        extra = f"; extra KV caches {fmt_bytes(self.extra_kv_bytes)}" if self.extra_kv_bytes else ""
        pre = "; " + self.prefill_graphs.report() if self.prefill_graphs is not None else ""
        return self.pool.report() + extra + "; " + self.sampling.graph_report() + pre
