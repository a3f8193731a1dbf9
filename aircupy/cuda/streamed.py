"""StreamedWeights: the weight source of a model whose streamed layers pass through device slots.

    w = StreamedWeights(placement, fp, g, pool, lib, streams, read_ahead, shuttle)
    w.begin_pass(kv); table = w.acquire(i); ...layer i...; w.release(i); w.end_pass()

The forward pass asks every layer's weights of its source (cuda/weights.py ResidentWeights answers
the same calls): a resident layer's table is a lookup, a streamed layer's is its slot's table once the
upload that filled the slot is done. Behind it, LayerStreamer (stream/streamer.py) on its own copy
stream: window -> pinned host buffer (Stager, with a RAM tier that keeps windows pinned after their
first read) -> per tensor, straight into the slot (types the kernels read as stored) or into one of
two `stream.staging` buffers and repacked into the slot on a third stream, the repack stream, while
the copy engine moves the next tensor (on one stream the DMA would idle during every repack). The
kernels and launch sequence are the resident ones, so streamed output equals resident output bit
for bit. A slot is bound once per layer layout (weights.bind): the pass swaps tables, not code.

KV shuttle (a PassKV given to begin_pass, cuda/shuttle.py): the streamer also moves the streamed
layers' KV up into the KV slot paired with the weight slot and their new rows back.
"""
from __future__ import annotations

import numpy as np

from aircupy.cuda.placement import STAGING_BUFFERS
from aircupy.cuda.weights import bind, direct_offset, repack_source, vector_values


class StreamedWeights:
    def __init__(self, placement, fp, g, pool, lib, stream, read_ahead, resident_tables: dict,
                 shuttle=None):
        """placement: cuda/placement.Placement (streams); fp: its Footprint; g: the open GGUFFile;
        stream: the compute stream; read_ahead: the model's page-cache warmer (or None);
        resident_tables: layer -> WeightTable of the resident layers; shuttle: KVShuttle or None."""
        import cupy as cp

        from aircupy.cuda.load import pinned_alloc
        from aircupy.stream.schedule import SlotSchedule
        from aircupy.stream.stager import Stager
        from aircupy.stream.streamer import LayerStreamer

        self.lib, self.layouts, self.tensors = lib, fp.layer_ls, g.tensors
        self.resident, self.shuttle = resident_tables, shuttle
        S = placement.streamed_layers
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.repack_stream = cp.cuda.Stream(non_blocking=True)
        self.slots = [pool.array(f"stream.slot{j}", placement.slot_bytes, np.uint8)
                      for j in range(placement.slots)]
        self.staging = [pool.array(f"stream.staging{j}", placement.staging_bytes, np.uint8)
                        for j in range(STAGING_BUFFERS)]
        self._staging_free = [None] * STAGING_BUFFERS   # repack-stream event: buffer j was read
        self._staging_next = 0
        self._manifest = fp.manifest
        self._vectors = self._pin_vectors(S)
        self._tables: dict = {}
        self.stager = Stager(g.path, n_buffers=placement.host_buffers,
                             buffer_bytes=placement.host_buffer_bytes, alloc=pinned_alloc,
                             ram_tier_bytes=placement.ram_tier_bytes, read_ahead=read_ahead,
                             defer_tier=True)
        self.streamer = LayerStreamer(SlotSchedule(len(fp.layer_ls), S, placement.slots),
                                      dict(placement.windows), self.slots, self._fill_slot,
                                      self.stager, stream, self.copy_stream, cuda=cp.cuda)

    # -- the weight-source calls of the forward pass -----------------------------------------------
    def begin_pass(self, kv) -> None:
        self.streamer.begin_pass(kv if self.shuttle is not None else None)

    def acquire(self, i: int):
        slot = self.streamer.acquire(i)
        return self.resident[i] if slot is None else self._slot_table(slot, i)

    def release(self, i: int) -> None:
        self.streamer.release(i)

    def end_pass(self) -> None:
        self.streamer.end_pass()

    def abort(self) -> None:
        self.streamer.abort()
        if self.shuttle is not None:
            self.shuttle.invalidate()

    def stats(self) -> dict:
        return self.streamer.stats()

    def close(self) -> None:
        self.stager.close()

    # -- slots -------------------------------------------------------------------------------------
    def _slot_table(self, slot: int, layer: int):
        key = (slot, id(self.layouts[layer]))
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = bind(self.layouts[layer], self.slots[slot])
        return t

    def _pin_vectors(self, layers) -> dict:
        """Room for the float32 vectors (norms, biases) of the streamed layers in one pinned array,
        filled at each layer's first upload from its window's bytes (_vector_from_window); later
        fills are then small pinned copies with no conversion on the hot path. Not read from the
        mmap at load: on a cold page cache that faults the vectors in one page at a time, scattered
        over the file."""
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
        """Piece p's values (weights.vector_values) from the layer's window bytes `host`, into its
        pinned room (converted once per layer and piece)."""
        v = self._vectors[(layer, p.role)]
        if (layer, p.role) not in self._vectors_set:
            chunk, raw = self._manifest.layers[layer], {}
            for name, _ in p.sources:
                sl, info = chunk.slice(name), self.tensors[name]
                raw[name] = (host[sl.offset:sl.offset + sl.nbytes], info.ggml_type, info.shape)
            v[:] = vector_values(p, raw)
            self._vectors_set.add((layer, p.role))
        return v

    def _fill_slot(self, layer: int, host: np.ndarray, block, stream):
        """Enqueue the upload of layer's window (`host`, pinned uint8) into `block`: DMAs on `stream`
        (the copy stream), repacks on the repack stream. Returns the event after which the slot is
        complete (the streamer makes compute wait on it), or None when nothing needed a repack."""
        import cupy as cp

        from aircupy.cuda.ops.packing import needs_repack
        chunk, base, rs = self._manifest.layers[layer], host.ctypes.data, self.repack_stream
        last = None
        for p in self.layouts[layer].pieces.values():
            dst = block[p.offset:p.offset + p.nbytes]
            if not p.is_matrix:
                v = self._vector_from_window(layer, p, host)
                dst.data.copy_from_host_async(v.ctypes.data, v.nbytes, stream)
                continue
            for name, row0 in p.sources:
                sl, info = chunk.slice(name), self.tensors[name]
                if not needs_repack(p.ggml_type):
                    off = direct_offset(p, row0)
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
                repack_source(self.lib, stage, dst, p, info.ggml_type, info.shape, row0, rs)
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
