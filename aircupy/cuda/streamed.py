"""StreamedCudaModel: the CUDA model for a VRAM budget smaller than the model, layers streamed per pass.

    model = StreamedCudaModel(g, config, n_ctx, vram_budget=8 << 30)   # same interface as CudaModel
    model.stats()   # bytes streamed, PCIe GB/s, stall, overlap, disk GB/s, RAM-tier hits

make_plan (loader/plan.py) and StreamPlacement decide which layers stay resident; those are filled
once, like CudaModel's. The others live in the file and pass through `slots` device blocks every
forward pass (each prefill chunk and each decode step is one pass), driven by LayerStreamer
(loader/streamer.py) on its own copy stream: window -> pinned host buffer (Stager, with a RAM tier
that keeps windows pinned after their first read) -> per tensor: straight into the slot (types the
kernels read as stored) or into one of two `stream.staging` buffers and repacked into the slot
(ops.repack) on a third stream, the repack stream, while the copy engine moves the next tensor. A slot is bound once per layer layout (cuda_weights.bind): the forward pass swaps tables.

The kernels and launch sequence are CudaModel's (ForwardPass.layer), so streamed output equals
resident output bit for bit. Decode runs eagerly: a captured graph would bake in the slot a layer
occupied at capture time and the host-side event waits.

KV: in VRAM for every layer, or, with the KV shuttle (kv_shuttle=True, or automatic when KV in
VRAM does not fit the budget or would stream more bytes, StreamPlacement.choose), in VRAM for the
resident layers only: a streamed layer's K/V live in pinned RAM (each cache its own) and ride up
into the KV slot paired with its weight slot, its new rows going back after its compute
(model/kv_shuttle.py; the streamer orders the copies). Every cache of a shuttled model runs eagerly
(never the pooled-cache graph path) and holds at most the n_ctx tokens the KV slots were sized for.
"""
from __future__ import annotations

import weakref

import numpy as np

from aircupy.cuda.pool import DevicePool, fmt_bytes
from aircupy.errors import InvalidParameterError
from aircupy.gguf.ggml import row_nbytes
from aircupy.gguf.quants import dequantize
from aircupy.stream.manifest import build_manifest
from aircupy.cuda.plan import PlanError, PlanSettings, make_plan
from aircupy.stream.schedule import SlotSchedule
from aircupy.stream.stager import Stager
from aircupy.stream.streamer import LayerStreamer
from aircupy.cuda.buffers import make_buffers
from aircupy.cuda.forward import HEAD_ROWS, ForwardPass
from aircupy.cuda.model import PREFILL_ROWS, CudaModel, _check_supported, _warm_cublas
from aircupy.cuda.sampling import DeviceSampling
from aircupy.cuda.weights import bind
from aircupy.cuda.shuttle import KVShuttle, ShuttleKVCache, cuda_copy_rows, pinned_f16
from aircupy.cuda import load as staged_fill
from aircupy.cuda.load import load_blocks, plan_load, start_read_ahead
from aircupy.cuda.placement import STAGING_BUFFERS, StreamPlacement

POOL_MARGIN = 512 << 20   # left outside the pool for cuBLAS, NVRTC modules (DevicePool's default)


class StreamedForwardPass(ForwardPass):
    """ForwardPass whose layer loop asks the streamer for each layer's weights."""

    def __init__(self, lib, config, glob, resident: dict, buf, streamer: LayerStreamer, slot_table,
                 shuttle: KVShuttle | None = None):
        super().__init__(lib, config, glob, [], buf)
        self.resident, self.streamer, self.slot_table = resident, streamer, slot_table
        self.shuttle = shuttle

    def run(self, ids, pos, T: int, kv) -> None:
        """kv: a cache, or with the shuttle the pass's PassKV (KVShuttle.bind)."""
        self.embed(ids, T)
        s = self.streamer
        s.begin_pass(kv if self.shuttle is not None else None)
        try:
            for i in range(self.c.n_layers):
                slot = s.acquire(i)
                L = self.resident[i] if slot is None else self.slot_table(slot, i)
                self.layer(i, L, pos, T, kv)
                s.release(i)
            s.end_pass()
        except BaseException:
            s.abort()
            if self.shuttle is not None:
                self.shuttle.invalidate()
            raise


def _auto_ram_tier(streamed_bytes: int, avail: int | None = None) -> int:
    """RAM-tier capacity: every streamed window while that takes at most half the available RAM
    (loader.staging.available_ram: page cache counts as available), else as many windows as half
    of it holds (the rest are read from the page cache or the disk each pass)."""
    from aircupy.stream.stager import available_ram
    avail = available_ram() if avail is None else avail
    return max(0, min(streamed_bytes, avail // 2))


class StreamedCudaModel(CudaModel):
    def __init__(self, g, config, n_ctx: int, vram_budget: int | None = None, progress=None, *,
                 prefill_rows: int = PREFILL_ROWS, lib=None, slots: int = 3,
                 ram_tier_bytes: int | None = None, n_resident: int | None = None,
                 kv_shuttle: bool | None = None, read_ahead=1):
        """vram_budget None: free memory minus POOL_MARGIN. n_resident forces the resident count
        (tests, benchmarks); the pool must still fit the budget. ram_tier_bytes None: automatic.
        kv_shuttle None: automatic (StreamPlacement.choose; with n_resident forced, the shuttle
        only when KV in VRAM would not fit); True/False force it (tests, benchmarks).
        read_ahead: reader threads of the cold-start page-cache warmer, 0 for none, or a
        ReadAhead the caller started (CudaModel's); the model closes it (at close(), or when it
        raises)."""
        c = self.config = config
        if n_ctx < 1:
            raise InvalidParameterError("n_ctx", f"must be positive, got {n_ctx}")
        self.n_ctx, self.rows = int(n_ctx), int(prefill_rows)
        sp, glob_l, layer_ls = StreamPlacement.for_model(g, c, self.n_ctx, self.rows, slots)
        _check_supported(c, [glob_l] + layer_ls)
        manifest = build_manifest(g)
        # Cold start (issue 5): the disk starts reading before the first CUDA call, in the order
        # the file will be consumed: globals, resident layers (when forced; chosen later
        # otherwise), then the windows of the first pass; the streamer's Stager paces it.
        first = sp.resident_for(n_resident) if n_resident is not None else ()
        order = list(first) + [i for i in range(c.n_layers) if i not in set(first)]
        self.warmer = start_read_ahead(g.path, plan_load([glob_l], g.tensors, g.file_size)
                                       .ranges + [(manifest.layers[i].offset,
                                                   manifest.layers[i].nbytes) for i in order],
                                       read_ahead)
        try:
            self._build(g, c, vram_budget, progress or (lambda stage: None), lib, slots,
                        ram_tier_bytes, n_resident, kv_shuttle, sp, glob_l, layer_ls, manifest)
        except BaseException:
            self.close()
            raise

    def _build(self, g, c, vram_budget, report, lib, slots, ram_tier_bytes, n_resident, kv_shuttle,
               sp, glob_l, layer_ls, manifest) -> None:
        """Placement, pool, kernels, resident weights, streamer (the body of __init__)."""
        import cupy as cp
        from aircupy.cuda.kernels import KernelLibrary

        free = int(cp.cuda.runtime.memGetInfo()[0])
        room = max(0, free - POOL_MARGIN)
        budget = room if vram_budget is None else min(int(vram_budget), room)
        try:
            self.plan = make_plan(manifest, c, budget, PlanSettings(
                n_ctx=self.n_ctx, prefill_chunk=self.rows, slots=slots))
        except PlanError:
            # make_plan's workspace is an estimate that errs high; the exact pool (sp) decides, and
            # raises its own PlanError with the exact minimum when even all-streamed does not fit.
            self.plan = None
        if n_resident is None:
            resident, shuttle = sp.choose(budget, kv_shuttle)
        else:
            resident = sp.resident_for(n_resident)
            shuttle = (sp.pool_plan(resident).total > budget if kv_shuttle is None
                       else bool(kv_shuttle))
        self.resident_layers = tuple(resident)
        self.streamed_layers = tuple(i for i in range(c.n_layers) if i not in set(resident))
        shuttle = shuttle and bool(self.streamed_layers)
        pool_plan = sp.pool_plan(resident, shuttle)
        self.pool = DevicePool(pool_plan, budget, margin=POOL_MARGIN,
                               what=f"{g.path.name} ({c.arch}, streamed)")

        self.lib = lib if lib is not None else KernelLibrary()
        # NVRTC / cubin load on a thread while the disk reads; warmup() below waits for it (and
        # compiles on this thread if that failed, raising the real error).
        self.lib.warmup_async()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.repack_stream = cp.cuda.Stream(non_blocking=True)
        self.buf = make_buffers(self.pool, c, self.rows, HEAD_ROWS)
        scratch = self.pool.array("scratch", pool_plan.regions["scratch"].nbytes, np.uint8)
        gblock = self.pool.array("weights.globals", glob_l.nbytes, np.uint8)
        from aircupy.cuda import ops
        _warm_cublas(ops, self.lib, c, layer_ls, scratch, self.stream)
        report("uploading resident weights to the GPU")
        # Globals and resident layers in one staged load (staged_fill: sequential pinned reads
        # overlapped with uploads and repacks; the same bytes as cuda_weights.fill).
        rblocks = {i: self.pool.array(f"weights.layer{i}", layer_ls[i].nbytes, np.uint8)
                   for i in resident}
        load = plan_load([glob_l] + [layer_ls[i] for i in resident], g.tensors, g.file_size)
        self.bytes_read = load_blocks(load, g.path, [gblock] + list(rblocks.values()), scratch,
                                      self.lib, self.stream, self.warmer,
                                      close_read_ahead=False)
        self.glob = bind(glob_l, gblock)
        tables = {i: bind(layer_ls[i], b) for i, b in rblocks.items()}
        self.layouts = layer_ls
        self.weight_bytes = sum(lay.nbytes for lay in layer_ls) + glob_l.nbytes

        S = self.streamed_layers
        self.stager = self.streamer = None
        if S:
            n = sp.slot_bytes(S)
            self.slots = [self.pool.array(f"stream.slot{j}", n, np.uint8)
                          for j in range(sp.slot_count(S))]
            self.staging = [self.pool.array(f"stream.staging{j}",
                                            pool_plan.regions[f"stream.staging{j}"].nbytes, np.uint8)
                            for j in range(STAGING_BUFFERS)]
            self._staging_free = [None] * STAGING_BUFFERS   # repack-stream event: buffer j read
            self._staging_next = 0
            self._manifest, self._tensors = manifest, g.tensors
            self._vectors = self._pin_vectors(S)
            windows = {i: (manifest.layers[i].offset, manifest.layers[i].nbytes) for i in S}
            total = sum(n for _, n in windows.values())
            tier = _auto_ram_tier(total) if ram_tier_bytes is None else int(ram_tier_bytes)
            self.stager = Stager(g.path, n_buffers=slots + 2,
                                 buffer_bytes=max(n for _, n in windows.values()),
                                 alloc=staged_fill.pinned_alloc, ram_tier_bytes=tier,
                                 read_ahead=self.warmer, defer_tier=True)
            self.streamer = LayerStreamer(SlotSchedule(c.n_layers, S, slots), windows, self.slots,
                                          self._fill_slot, self.stager, self.stream, self.copy_stream)
        self._slot_tables: dict = {}

        self._pool_cache = None
        self.extra_kv_bytes = 0
        self.shuttle = None
        if shuttle:
            self._init_shuttle()
        else:
            kv = self.pool.array("kv", (2, c.n_layers, 1, c.n_head_kv, self.n_ctx, c.head_dim),
                                 np.float16)
            self._kv_pool = (list(kv[0]), list(kv[1]))

        report("compiling GPU kernels")
        self.lib.warmup()
        if self.streamer is None:
            self.fwd = ForwardPass(self.lib, c, self.glob, [tables[i] for i in range(c.n_layers)],
                                   self.buf)
        else:
            self.fwd = StreamedForwardPass(self.lib, c, self.glob, tables, self.buf, self.streamer,
                                           self._slot_table, self.shuttle)
        # Eager decode when anything streams (see module doc); all resident: graphs as CudaModel.
        self.sampling = DeviceSampling(self, use_graphs=self.streamer is None)
        self.stream.synchronize()

    # -- KV shuttle --------------------------------------------------------------------------------
    def _init_shuttle(self) -> None:
        """KV slots (one K and V block per weight slot), the resident layers' KV in the pool, and the
        pinned host KV of the streamed layers for the start-up cache."""
        c, n = self.config, self.n_ctx
        per = c.n_head_kv * n * c.head_dim             # float16 elements of one K (or V)
        kvs = [self.pool.array(f"stream.kvslot{j}", 2 * per, np.float16)
               for j in range(len(self.slots))]
        self.shuttle = KVShuttle([b[:per] for b in kvs], [b[per:] for b in kvs], c.n_head_kv,
                                 c.head_dim, n, cuda_copy_rows)
        shape = (1, c.n_head_kv, n, c.head_dim)
        k, v = [None] * c.n_layers, [None] * c.n_layers
        if self.resident_layers:
            kv = self.pool.array("kv", (2, len(self.resident_layers)) + shape, np.float16)
            for j, i in enumerate(self.resident_layers):
                k[i], v[i] = kv[0, j], kv[1, j]
        for i in self.streamed_layers:
            k[i], v[i] = pinned_f16(shape), pinned_f16(shape)
        self._kv_pool = (k, v)       # the start-up cache's arrays (DeviceSampling keeps a view)
        self.host_kv_bytes = 2 * len(self.streamed_layers) * per * 2

    def new_cache(self, n_ctx: int):
        """KV in VRAM: CudaModel's. Shuttled: the start-up KV when free (pool + pinned start-up host
        KV), else new arrays (resident layers' on the device, streamed layers' pinned), at most the
        n_ctx the KV slots hold."""
        import cupy as cp
        if self.shuttle is None:
            return super().new_cache(n_ctx)
        c = self.config
        if not 1 <= n_ctx <= self.n_ctx:
            raise InvalidParameterError("n_ctx", f"must be 1 .. {self.n_ctx} (the KV shuttle's slots "
                                                 f"hold {self.n_ctx} tokens), got {n_ctx}")
        held = self._pool_cache() if self._pool_cache is not None else None
        if held is None:
            k, v = list(self._kv_pool[0]), list(self._kv_pool[1])
        else:
            # Pinned memory of a dropped cache may still be the target of a queued download: let the
            # copy stream drain before pinned memory is handed out again (set-up time only).
            self.copy_stream.synchronize()
            shape = (1, c.n_head_kv, n_ctx, c.head_dim)
            k, v = [None] * c.n_layers, [None] * c.n_layers
            for i in range(c.n_layers):
                if i in self.resident_layers:
                    k[i], v[i] = cp.empty(shape, cp.float16), cp.empty(shape, cp.float16)
                    self.extra_kv_bytes += 2 * k[i].nbytes
                else:
                    k[i], v[i] = pinned_f16(shape), pinned_f16(shape)
        cache = ShuttleKVCache(k, v, n_ctx, self.streamed_layers, self.shuttle.new_token())
        if held is None:
            self._pool_cache = weakref.ref(cache)
        return cache

    def prefill_chunk(self, ids: np.ndarray, pos: np.ndarray, cache) -> int:
        if self.shuttle is None:
            return super().prefill_chunk(ids, pos, cache)
        if not isinstance(cache, ShuttleKVCache):
            raise InvalidParameterError("cache", "a model with the KV shuttle runs on caches of its "
                                                 "own new_cache()")
        n = len(ids)
        self.buf.ids[:n].set(ids, stream=self.stream)
        self.buf.pos[:n].set(pos, stream=self.stream)
        self.fwd.run(self.buf.ids[:n], self.buf.pos[:n], n, self.shuttle.bind(cache, int(pos[0]), n))
        return n

    # -- slots -------------------------------------------------------------------------------------
    def _slot_table(self, slot: int, layer: int):
        key = (slot, id(self.layouts[layer]))
        t = self._slot_tables.get(key)
        if t is None:
            t = self._slot_tables[key] = bind(self.layouts[layer], self.slots[slot])
        return t

    def _pin_vectors(self, layers) -> dict:
        """Room for the float32 vectors (norms, biases) of the streamed layers in one pinned array,
        filled at each layer's first upload from its window's bytes (_vector_from_window): per fill
        they are then small pinned copies, with no conversion on the hot path. Not from the mmap at
        load: on a cold page cache that read the vectors one page fault at a time, scattered over
        the file (about half a second of the streamed model's start-up on the H200 host, 2026-11-27)."""
        import cupyx
        keys = [(i, p) for i in layers for p in self.layouts[i].pieces.values() if not p.is_matrix]
        pinned = cupyx.empty_pinned((sum(p.shape[0] for _, p in keys),), dtype=np.float32)
        out, o = {}, 0
        for i, p in keys:
            out[(i, p.role)] = pinned[o:o + p.shape[0]]
            o += p.shape[0]
        self._vectors_mem, self._vectors_set = pinned, set()
        return out

    def _vector_from_window(self, layer: int, p, host: np.ndarray) -> np.ndarray:
        """cuda_weights._host_vector of piece p, from the layer's window bytes `host`, into its
        pinned room (once per layer and piece)."""
        v = self._vectors[(layer, p.role)]
        if (layer, p.role) not in self._vectors_set:
            chunk = self._manifest.layers[layer]
            v[:] = 0
            for name, row0 in p.sources:
                sl, info = chunk.slice(name), self._tensors[name]
                x = dequantize(host[sl.offset:sl.offset + sl.nbytes], info.ggml_type, info.shape)
                v[row0:row0 + x.size] = x.reshape(-1)
            self._vectors_set.add((layer, p.role))
        return v

    def _fill_slot(self, layer: int, host: np.ndarray, block, stream):
        """Enqueue the upload of layer's window (`host`, pinned uint8) into `block`: DMAs on `stream`
        (the copy stream), repacks on the repack stream. Returns the event after which the slot is
        complete (the streamer makes compute wait on it), or None when nothing needed a repack.

        Tensors the kernels read as stored go straight into the slot. The others are DMAed into the
        two staging buffers in turn and repacked from there on the repack stream, so the copy engine
        moves the next tensor while the SMs repack the previous one (on one stream the DMA would
        idle during every repack: 88% of the pinned rate on an 8B Q4_0, measured on an H200)."""
        import cupy as cp

        from aircupy.cuda import ops
        chunk, base, rs = self._manifest.layers[layer], host.ctypes.data, self.repack_stream
        last = None
        for p in self.layouts[layer].pieces.values():
            dst = block[p.offset:p.offset + p.nbytes]
            if not p.is_matrix:
                v = self._vector_from_window(layer, p, host)
                dst.data.copy_from_host_async(v.ctypes.data, v.nbytes, stream)
                continue
            t, (n_rows, k) = p.ggml_type, p.shape
            for name, row0 in p.sources:
                sl, info = chunk.slice(name), self._tensors[name]
                if not ops.needs_repack(t):
                    off = row0 * row_nbytes(t, k)
                    dst[off:off + sl.nbytes].data.copy_from_host_async(base + sl.offset, sl.nbytes,
                                                                       stream)
                    continue
                j = self._staging_next
                self._staging_next = (j + 1) % len(self.staging)
                if self._staging_free[j] is not None:       # its last repack has read it
                    stream.wait_event(self._staging_free[j])
                stage = self.staging[j][:sl.nbytes]
                stage.data.copy_from_host_async(base + sl.offset, sl.nbytes, stream)
                dma = cp.cuda.Event(disable_timing=True)
                dma.record(stream)
                rs.wait_event(dma)
                if len(p.sources) == 1:
                    ops.repack(self.lib, stage, dst, t, info.shape, stream=rs)
                else:
                    ops.repack(self.lib, stage, dst, t, info.shape, row0=row0, dst_rows=n_rows,
                               stream=rs)
                last = self._staging_free[j] = cp.cuda.Event(disable_timing=True)
                last.record(rs)
        if last is None:
            return None
        # The slot is complete when both the DMAs (copy stream) and the repacks are: one event on
        # the repack stream after it has also waited for the copy stream's last DMA.
        tail = cp.cuda.Event(disable_timing=True)
        tail.record(stream)
        rs.wait_event(tail)
        done = cp.cuda.Event(disable_timing=True)
        done.record(rs)
        return done

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Streaming figures (cumulative, and `last_pass`), plus the placement."""
        out = dict(resident_layers=len(self.resident_layers), streamed_layers=len(self.streamed_layers),
                   pool_bytes=self.pool.plan.total, vram_budget=self.pool.budget,
                   slots=len(getattr(self, "slots", ())), kv_shuttle=self.shuttle is not None)
        if self.streamer is not None:
            out.update(self.streamer.stats())
        return out

    def allocation_report(self) -> str:
        kv = (f"; KV of streamed layers shuttled ({fmt_bytes(self.host_kv_bytes)} pinned)"
              if self.shuttle is not None else "")
        return (f"{len(self.resident_layers)} resident / {len(self.streamed_layers)} streamed layers "
                f"(budget {fmt_bytes(self.pool.budget)}{kv}); " + super().allocation_report())

    def close(self) -> None:
        if self.warmer is not None:
            self.warmer.close()
        if getattr(self, "stager", None) is not None:
            self.stager.close()
