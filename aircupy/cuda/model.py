"""CudaModel: the GPU model, resident or streamed, behind the engine's Model protocol.

    model = CudaModel(g, config, n_ctx, vram_budget=None)       # places itself (cuda/placement.py)
    cache = model.new_cache(n_ctx)
    logits = model.forward(ids (T,), positions (T,), cache, all_logits=False)
    token = model.forward_sample(ids, positions, cache, model.new_sampler(params))   # only the id crosses
    kv = model.new_kv_pool(**model.kv_spec())                   # continuous batching (cuda/batch.py)
    ids, logits = model.forward_step_sample(step.arrays(), kv, samplers)

One constructor for every VRAM budget. The placement planner decides which layers stay resident and
where the KV cache lives; the model allocates that placement's pool (one allocation), loads the
globals and resident layers through the staged load (cuda/load.py), and gives the forward pass a
weight source: ResidentWeights when everything is resident, StreamedWeights (cuda/streamed.py) when
layers stream. The forward pass (cuda/forward.py) is the same launch sequence either way, so streamed
logits equal resident logits bit for bit.

Graphs: when nothing streams, a single-token step on the start-up KV cache replays a captured CUDA
graph (cuda/sampling.py), and so does a prefill chunk of T >= 2 tokens on that cache once its T has a
captured graph (cuda/prefill.py). A streamed pass runs eagerly: a graph would bake in the slot a
layer occupied at capture time and the host-side waits of the streamer.

KV: a paged block pool in the device pool for every layer (cuda/kv.py), shared by the batch steps'
sequences and, through the identity block table, by the single-sequence start-up cache; or with the
KV shuttle (the placement's choice) slabs for the resident layers only, a streamed layer's K/V living
in pinned RAM and riding up with its layer (cuda/shuttle.py); every cache of a shuttled model runs
eagerly and holds at most n_ctx tokens, and its batch steps hold one sequence (kv_spec()).
"""
from __future__ import annotations

import weakref

import numpy as np

from aircupy.cuda.buffers import make_buffers
from aircupy.cuda.forward import ForwardPass
from aircupy.cuda.kv import KV_BLOCK, CudaKVCache, PagedKV
from aircupy.cuda.load import load_blocks, plan_load, start_read_ahead
from aircupy.cuda.placement import (ASSUMED_CONTEXT, HEAD_ROWS, POOL_MARGIN, CudaOptions, Footprint,
                                    effective_budget, plan_model, resident_set)
from aircupy.cuda.pool import DevicePool, ModelTooLargeError, fmt_bytes
from aircupy.cuda.prefill import PrefillGraphs
from aircupy.cuda.sampling import DeviceSampler, DeviceSampling
from aircupy.cuda.weights import ResidentWeights, bind
from aircupy.errors import ContextLengthError, InvalidParameterError, UnsupportedModelError
from aircupy.gguf.ggml import SUPPORTED_COMPUTE


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


def _warm_cublas(lib, c, layer_ls, scratch, stream) -> None:
    """cuBLAS's first-use costs at load, while the disk is the bound, not at the first prompt: a GEMM
    per layer matrix shape that prefill gives to cuBLAS, on `scratch` (the load's device staging;
    `stream` orders them before the load's copies into it)."""
    from aircupy.cuda import ops
    from aircupy.cuda.ops.gemm_choice import prefill_path
    rows = 16
    shapes = {p.shape for lay in layer_ls for p in lay.matrices()
              if prefill_path(p.ggml_type.name, p.shape[0], p.shape[1], rows) == "cublas"}
    ops.warm_gemm(lib, shapes, scratch, half="bf16" if c.arch == "gemma3" else "f16", rows=rows,
                  stream=stream)


class CudaModel:
    def __init__(self, g, config, n_ctx: int, vram_budget: int | None = None, progress=None, *,
                 options: CudaOptions | None = None, lib=None, read_ahead=1):
        """vram_budget: bytes this process may hold on the device, the CUDA context and libraries
        included (cuda/memory.py); None: the pool takes the free device memory minus POOL_MARGIN.
        lib: a KernelLibrary to share between models (compiles once). read_ahead: reader threads
        of the cold-start page-cache warmer, 0 for none, or a ReadAhead the caller started; the
        model closes it (at close(), or when it raises)."""
        import cupy as cp

        from aircupy.cuda.memory import OUTSIDE_RESERVE, DeviceMeter
        from aircupy.stream.stager import available_ram
        self.options = o = options or CudaOptions()
        self.config = c = config
        if n_ctx < 1:
            raise InvalidParameterError("n_ctx", f"must be positive, got {n_ctx}")
        self.n_ctx, self.rows = int(n_ctx), int(o.prefill_rows)
        self.fp = fp = Footprint.of(g, c, self.n_ctx, self.rows, o.kv_tokens, o.max_seqs)
        _check_supported(c, [fp.glob_l] + fp.layer_ls)
        ram = available_ram()
        # The disk starts reading before the first CUDA call, in the order the load consumes the
        # file; whether layers stream is judged on the stated budget, before the device is asked.
        outside = 0 if vram_budget is None else ASSUMED_CONTEXT + OUTSIDE_RESERVE
        if o.outside_bytes is not None:
            outside = int(o.outside_bytes)
        self.warmer = start_read_ahead(g.path, self._read_order(g, vram_budget, outside, o), read_ahead)
        self.fwd = self.weights = None
        self.vram_budget = vram_budget
        self.meter = DeviceMeter()             # before this model's first CUDA call
        try:
            free = cp.cuda.runtime.memGetInfo()[0]
            if vram_budget is not None and o.outside_bytes is None:   # measured, not assumed
                outside = self.meter.held() + OUTSIDE_RESERVE
            budget = effective_budget(vram_budget, free, outside)
            self.placement = plan_model(g, c, self.n_ctx, budget, o, ram, footprint=fp,
                                        outside_bytes=outside)
            self._build(g, cp, lib, progress or (lambda stage: None))
            self._check_device_memory()
        except BaseException:
            self.close()
            raise

    def _read_order(self, g, vram_budget, outside: int, o: CudaOptions) -> list[tuple[int, int]]:
        """File ranges in load order: everything resident, the staged load's ranges; streamed, the
        globals' then the layer windows in file order (forced resident layers first)."""
        fp, L = self.fp, len(self.fp.layer_ls)
        if o.n_resident is not None:
            streams = o.n_resident < L
        else:
            streams = (vram_budget is not None and
                       fp.pool_plan(range(L), False, o.slots).total > vram_budget - outside)
        if not streams:
            return plan_load([fp.glob_l] + fp.layer_ls, g.tensors, g.file_size).ranges
        first = list(resident_set(L, o.n_resident)) if o.n_resident is not None else []
        order = first + [i for i in range(L) if i not in set(first)]
        windows = fp.windows
        return plan_load([fp.glob_l], g.tensors, g.file_size).ranges + [windows[i] for i in order]

    def _build(self, g, cp, lib, report) -> None:
        from aircupy.cuda.kernels import KernelLibrary
        c, fp, p = self.config, self.fp, self.placement
        if p.streams:
            report("the model exceeds the VRAM budget: streaming layers")
        self.pool = DevicePool(p.pool, p.pool_budget, margin=POOL_MARGIN,
                               what=f"{g.path.name} ({c.arch})")
        self.lib = lib if lib is not None else KernelLibrary()
        # NVRTC / cubin load on a thread while the disk reads; warmup() below waits for it (and
        # compiles on this thread if that failed, raising the real error).
        self.lib.warmup_async()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.buf = make_buffers(self.pool, c, self.rows, HEAD_ROWS, fp.max_seqs, fp.max_blocks)
        scratch = self.pool.array("scratch", p.pool.regions["scratch"].nbytes, np.uint8)
        _warm_cublas(self.lib, c, fp.layer_ls, scratch, self.stream)
        report("uploading weights to the GPU")
        blocks = [self.pool.array("weights.globals", fp.glob_l.nbytes, np.uint8)]
        blocks += [self.pool.array(f"weights.layer{i}", fp.layer_ls[i].nbytes, np.uint8)
                   for i in p.resident_layers]
        load = plan_load([fp.glob_l] + [fp.layer_ls[i] for i in p.resident_layers], g.tensors,
                         g.file_size)
        self.bytes_read = load_blocks(load, g.path, blocks, scratch, self.lib, self.stream,
                                      self.warmer, close_read_ahead=not p.streams)
        if not p.streams:
            self.warmer = None                 # load_blocks closed it
        self.glob = bind(fp.glob_l, blocks[0])
        tables = {i: bind(fp.layer_ls[i], b) for i, b in zip(p.resident_layers, blocks[1:])}
        self.weight_bytes = sum(lay.nbytes for lay in fp.layer_ls) + fp.glob_l.nbytes
        self._pool_cache = None   # weakref to the cache object that holds the pooled KV
        self.extra_kv_bytes = 0
        self.shuttle = None
        self._init_kv(p)
        if p.streams:
            from aircupy.cuda.streamed import StreamedWeights
            self.weights = StreamedWeights(p, fp, g, self.pool, self.lib, self.stream, self.warmer,
                                           tables, self.shuttle)
        else:
            self.weights = ResidentWeights([tables[i] for i in range(c.n_layers)])
        report("compiling GPU kernels")
        self.lib.warmup()
        self.fwd = ForwardPass(self.lib, c, self.glob, self.weights, self.buf)
        graphs = self.options.use_graphs and not p.streams
        self.sampling = DeviceSampling(self, use_graphs=graphs)
        from aircupy.cuda.batch import StepRunner
        self.batch = StepRunner(self, use_graphs=graphs)
        self.prefill_graphs = None
        if graphs and self.options.prefill_graph_slots > 0:
            self._enable_prefill_graphs(self.options.prefill_graph_slots)
        self.stream.synchronize()

    def _check_device_memory(self) -> None:
        """After the load (context, pool, kernels, cuBLAS warmed, graphs set up): what the process
        holds on the device must be within the budget; over it is an error, not a quiet overrun."""
        self.device_bytes = self.meter.held()
        checked = self.vram_budget is not None and self.options.outside_bytes is None
        if checked and self.device_bytes > self.vram_budget:
            raise ModelTooLargeError(
                f"after loading, this process holds {fmt_bytes(self.device_bytes)} on the GPU "
                f"({self.meter.source}): the pool {fmt_bytes(self.pool.plan.total)} and "
                f"{fmt_bytes(self.device_bytes - self.pool.plan.total)} for the CUDA context and "
                f"libraries, over the VRAM budget {fmt_bytes(self.vram_budget)}")

    # -- KV ----------------------------------------------------------------------------------------
    def _init_kv(self, p) -> None:
        """The start-up cache's arrays: every layer's K and V in the pool, or with the shuttle the
        resident layers' in the pool, the streamed layers' in pinned RAM, and the KV slots."""
        import cupy as cp
        c, n = self.config, self.n_ctx
        self.paged = None
        self._kv_table = None
        if not p.shuttle:
            nb = self.fp.kv_tokens // KV_BLOCK
            kv = self.pool.array("kv", (2, c.n_layers, nb, c.n_head_kv, KV_BLOCK, c.head_dim), np.float16)
            self._kv_pool = (list(kv[0]), list(kv[1]))
            self.paged = PagedKV(self._kv_pool[0], self._kv_pool[1], KV_BLOCK)
            # the single-sequence caches read the pool through the identity table: position p at slot p
            self._kv_table = cp.arange(self.fp.max_blocks, dtype=np.int32).reshape(1, -1)
            return
        from aircupy.cuda.shuttle import KVShuttle, cuda_copy_rows, pinned_f16
        per = c.n_head_kv * n * c.head_dim             # float16 elements of one K (or V)
        kvs = [self.pool.array(f"stream.kvslot{j}", 2 * per, np.float16) for j in range(p.slots)]
        self.shuttle = KVShuttle([b[:per] for b in kvs], [b[per:] for b in kvs], c.n_head_kv,
                                 c.head_dim, n, cuda_copy_rows)
        shape = (1, c.n_head_kv, n, c.head_dim)
        k, v = [None] * c.n_layers, [None] * c.n_layers
        if p.resident_layers:
            kv = self.pool.array("kv", (2, len(p.resident_layers)) + shape, np.float16)
            for j, i in enumerate(p.resident_layers):
                k[i], v[i] = kv[0, j], kv[1, j]
        for i in p.streamed_layers:
            k[i], v[i] = pinned_f16(shape), pinned_f16(shape)
        self._kv_pool = (k, v)

    def new_cache(self, n_ctx: int) -> CudaKVCache:
        """The start-up KV cache when it is free and large enough; otherwise new arrays outside the
        pool (set-up time only, never in the forward pass). A shuttled model's caches hold at most
        the n_ctx its KV slots were sized for."""
        import cupy as cp
        c = self.config
        if n_ctx < 1:
            raise InvalidParameterError("n_ctx", f"must be positive, got {n_ctx}")
        held = self._pool_cache() if self._pool_cache is not None else None
        if self.shuttle is None:
            if held is None and n_ctx <= self.n_ctx:
                cache = self.pooled_cache(n_ctx)
                self._pool_cache = weakref.ref(cache)
                return cache
            nb = -(-n_ctx // KV_BLOCK)
            shape = (c.n_layers, nb, c.n_head_kv, KV_BLOCK, c.head_dim)
            k, v = cp.empty(shape, cp.float16), cp.empty(shape, cp.float16)
            self.extra_kv_bytes += 2 * k.nbytes
            table = cp.arange(nb, dtype=np.int32).reshape(1, -1)
            return CudaKVCache(list(k), list(v), n_ctx, pooled=False, table=table)
        from aircupy.cuda.shuttle import ShuttleKVCache, pinned_f16
        if n_ctx > self.n_ctx:
            raise InvalidParameterError("n_ctx", f"must be 1 .. {self.n_ctx} (the KV shuttle's slots "
                                                 f"hold {self.n_ctx} tokens), got {n_ctx}")
        p = self.placement
        if held is None:
            k, v = list(self._kv_pool[0]), list(self._kv_pool[1])
        else:
            # Pinned memory of a dropped cache may still be the target of a queued download: let the
            # copy stream drain before pinned memory is handed out again (set-up time only).
            self.weights.copy_stream.synchronize()
            shape = (1, c.n_head_kv, n_ctx, c.head_dim)
            k, v = [None] * c.n_layers, [None] * c.n_layers
            for i in range(c.n_layers):
                if i in p.resident_layers:
                    k[i], v[i] = cp.empty(shape, cp.float16), cp.empty(shape, cp.float16)
                    self.extra_kv_bytes += 2 * k[i].nbytes
                else:
                    k[i], v[i] = pinned_f16(shape), pinned_f16(shape)
        cache = ShuttleKVCache(k, v, n_ctx, p.streamed_layers, self.shuttle.new_token())
        if held is None:
            self._pool_cache = weakref.ref(cache)
        return cache

    def pooled_cache(self, n_ctx: int | None = None) -> CudaKVCache:
        """A single-sequence cache over the pooled KV (what the decode and prefill graphs capture);
        without the shuttle it is the paged pool through the identity table, so it shares the blocks
        of the batch steps' pool (a model runs one or the other)."""
        return CudaKVCache(*self._kv_pool, n_ctx or self.n_ctx, pooled=True, table=self._kv_table)

    # -- prefill graphs ----------------------------------------------------------------------------
    def _enable_prefill_graphs(self, slots: int) -> None:
        """Pinned inputs of graphed prefill chunks: ids and positions (rows,) int32, copied to
        buf.ids / buf.pos by the pass itself (PinnedIO: memcpy nodes in the graph)."""
        from aircupy.cuda.graphs import PinnedIO
        self._prefill_in = (PinnedIO(self.buf.ids), PinnedIO(self.buf.pos))
        self._prefill_kv = self.pooled_cache()  # the graphs' KV
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

    # -- the Model protocol ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_step(self, token_ids, positions, cache) -> tuple[np.ndarray, np.ndarray]:
        """Validated int32 copies of ids and positions: T >= 1 ids in the vocabulary, room in the
        cache, and positions that continue it (cache.length + arange(T): the rows written)."""
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

    def forward(self, token_ids, positions, cache, all_logits: bool = False) -> np.ndarray:
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
        """Upload <= prefill_rows ids/positions (stream-ordered) and run every layer on them."""
        n = len(ids)
        if self.prefill_graphs is not None and cache.pooled and n > 1:
            # The pinned inputs are read when the pass's first nodes run: wait until the previous
            # chunk's pass (if still queued) has read them before overwriting.
            self.stream.synchronize()
            self._prefill_in[0].host[:n] = ids
            self._prefill_in[1].host[:n] = pos
            self.prefill_graphs.launch(n)
            return n
        kv = cache
        if self.shuttle is not None:
            from aircupy.cuda.shuttle import ShuttleKVCache
            if not isinstance(cache, ShuttleKVCache):
                raise InvalidParameterError("cache", "a model with the KV shuttle runs on caches of "
                                                     "its own new_cache()")
            kv = self.shuttle.bind(cache, int(pos[0]), n)
        self.buf.ids[:n].set(ids, stream=self.stream)
        self.buf.pos[:n].set(pos, stream=self.stream)
        self.fwd.run(self.buf.ids[:n], self.buf.pos[:n], n, kv)
        return n

    def new_sampler(self, params) -> DeviceSampler | None:
        """Device-sampling state of one request, or None when its parameters need the host sampler
        (logit bias, penalties)."""
        s = DeviceSampler(params)
        return s if s.supported else None

    def forward_sample(self, token_ids, positions, cache, sampler: DeviceSampler) -> int:
        """Run the tokens and sample the next one on the device (temperature 0 = argmax); only
        the id crosses to the host."""
        return self.sampling.forward_sample(token_ids, positions, cache, sampler)

    # -- continuous batching (cuda/batch.py) ------------------------------------------------------
    def kv_spec(self) -> dict:
        """What the KV memory allows a scheduler: the paged pool's blocks and the step buffers'
        sequences; with the KV shuttle one n_ctx-token block, one sequence at a time."""
        if self.paged is None:
            return dict(block_size=self.n_ctx, num_blocks=1, max_num_seqs=1)
        return dict(block_size=KV_BLOCK, num_blocks=self.paged.num_blocks, max_num_seqs=self.fp.max_seqs)

    def new_kv_pool(self, num_blocks: int, block_size: int):
        """The pool for batch steps: the paged KV region (num_blocks <= kv_spec()'s, block_size its);
        with the shuttle, a single-sequence cache the steps run on (cuda/batch.py ShuttleSteps)."""
        spec = self.kv_spec()
        if block_size != spec["block_size"] or not 1 <= num_blocks <= spec["num_blocks"]:
            raise InvalidParameterError("kv", f"this model's KV holds {spec['num_blocks']} blocks of "
                                              f"{spec['block_size']} tokens (kv_spec()), asked {num_blocks} "
                                              f"of {block_size}")
        if self.paged is None:
            return self.new_cache(self.n_ctx)
        return self.paged

    def forward_step(self, arrays: dict, kv) -> np.ndarray:
        """Logits (R, vocab) of the step's logits rows (engine/step.py), on the host."""
        return self.forward_step_sample(arrays, kv, None)[1]

    def forward_step_sample(self, arrays: dict, kv, samplers):
        """Run a batch step; (ids int32 (R,), logits (R, vocab) | None): rows with a device sampler
        (new_sampler) are sampled on the GPU, the others' logits come back (ids -1)."""
        if self.paged is None:
            from aircupy.cuda.batch import shuttle_step
            return shuttle_step(self, arrays, kv, samplers)
        return self.batch.run(arrays, kv, samplers)

    def stats(self) -> dict:
        """The placement, and the streaming figures (cumulative, and `last_pass`) when layers stream."""
        p = self.placement
        out = dict(resident_layers=len(p.resident_layers), streamed_layers=len(p.streamed_layers),
                   pool_bytes=p.vram_bytes, vram_budget=p.vram_budget, slots=p.slots,
                   kv_shuttle=p.shuttle, device_bytes=self.meter.held())
        out.update(self.weights.stats())
        return out

    def allocation_report(self) -> str:
        """What was allocated on the GPU and for what (one line)."""
        p = self.placement
        kv = (f"; KV of streamed layers shuttled ({fmt_bytes(p.host_kv_bytes)} pinned)"
              if p.shuttle else "")
        extra = f"; extra KV caches {fmt_bytes(self.extra_kv_bytes)}" if self.extra_kv_bytes else ""
        pre = "; " + self.prefill_graphs.report() if self.prefill_graphs is not None else ""
        head = f"{p.report()}{kv}; " if p.streams else ""
        held = f"; process holds {fmt_bytes(self.meter.held())} on the GPU ({self.meter.source})"
        return (head + self.pool.report() + held + extra + "; " + self.sampling.graph_report() + pre
                + "; " + self.batch.report())

    def close(self) -> None:
        if self.warmer is not None:
            self.warmer.close()
            self.warmer = None
        if self.weights is not None:
            self.weights.close()
