"""Staged weight load: the file read in large sequential preads, overlapped with uploads and repacks.

    plan = plan_load([glob_l, layer0_l, ...], g.tensors, g.file_size)    # pure data, no cupy
    with Stager(g.path, n_buffers=4, buffer_bytes=plan.chunk, alloc=pinned) as st:
        run_load(plan, st, CudaSink(blocks, staging, lib, stream))       # blocks[i] <- layouts[i]

Why (issue 5, cold start): cuda_weights.fill copies each tensor from the mmap view, so a cold page
cache is read by page faults inside pageable cudaMemcpys, one tensor at a time, with the disk idle
during every upload and repack. Here the disk side is a Stager ring (reader threads preadv `chunk`
bytes, 4 KiB-aligned, in file order, into pinned buffers) and the device side consumes each filled
buffer while the next ones are read: per tensor segment, a DMA straight into its rows (types the
kernels read as stored), or into the device staging buffer and, once the tensor is complete, a repack
into its piece (ops.repack, exactly what fill does, so the pool bytes are identical); vectors are
gathered on the host and converted with the same dequantize as fill's _host_vector. A host buffer is
refilled only after an event recorded behind its DMAs (the Stager's `ready`).

Every tensor is read once even when two pieces use it. The device staging holds one tensor at a time:
tensors complete in file order, and a tensor's DMAs and repack sit on one stream, so the next
tensor's DMAs into the staging buffer are ordered behind the previous repack.

HostSink is the numpy twin of CudaSink (tests, and the CPU benchmark bench/bench_cold_read.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType, row_nbytes
from aircupy.gguf.quants import dequantize
from aircupy.stream.manifest import PAGE

CHUNK = 32 << 20   # bytes per read: large sequential preads run at the disk's rate


@dataclass(frozen=True)
class Use:
    """One destination of a tensor: rows [row0, row0 + rows) of `piece` in block `block`."""
    block: int
    piece: object        # cuda_layout.Piece
    row0: int


@dataclass(frozen=True)
class Source:
    """One tensor of the file, read once, with every piece that takes it."""
    name: str
    offset: int          # absolute file offset
    nbytes: int
    ggml_type: GGMLType
    shape: tuple[int, ...]
    uses: tuple[Use, ...]

    @property
    def is_vector(self) -> bool:
        return not self.uses[0].piece.is_matrix


@dataclass(frozen=True)
class Segment:
    source: int          # index into LoadPlan.sources
    read_off: int        # bytes into the read's buffer
    src_off: int         # bytes into the tensor
    nbytes: int


@dataclass(frozen=True)
class Read:
    offset: int          # file offset, a multiple of PAGE
    nbytes: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class LoadPlan:
    sources: tuple[Source, ...]   # in file order
    reads: tuple[Read, ...]       # in file order
    chunk: int

    @property
    def bytes_read(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(r.offset, r.nbytes) for r in self.reads]


def plan_load(layouts, tensors, file_size: int, chunk: int = CHUNK) -> LoadPlan:
    """Sources of every piece of `layouts` (block i = layouts[i]) and the reads covering them: the
    tensors' byte ranges widened to pages, merged where they touch, cut into `chunk`-byte reads."""
    if chunk % PAGE:
        raise ValueError(f"chunk must be a multiple of {PAGE}")
    uses: dict[str, list[Use]] = {}
    for b, lay in enumerate(layouts):
        for p in lay.pieces.values():
            for name, row0 in p.sources:
                uses.setdefault(name, []).append(Use(b, p, row0))
    kinds = {name: {u.piece.is_matrix for u in us} for name, us in uses.items()}
    for name, k in kinds.items():
        if len(k) > 1:
            raise ValueError(f"tensor {name!r} is used both as a matrix and as a vector")
    srcs = sorted((Source(n, tensors[n].offset, tensors[n].nbytes, GGMLType(tensors[n].ggml_type),
                          tuple(tensors[n].shape), tuple(us)) for n, us in uses.items()),
                  key=lambda s: s.offset)
    spans: list[list[int]] = []                       # merged page-widened [start, end)
    for s in srcs:
        lo, hi = s.offset // PAGE * PAGE, min(-(-(s.offset + s.nbytes) // PAGE) * PAGE, file_size)
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    bounds = [(o, min(chunk, hi - o)) for lo, hi in spans for o in range(lo, hi, chunk)]
    starts = [o for o, _ in bounds]
    segs: list[list[Segment]] = [[] for _ in bounds]
    for i, s in enumerate(srcs):
        pos, end = s.offset, s.offset + s.nbytes
        r = bisect.bisect_right(starts, pos) - 1
        while pos < end:
            ro, rn = bounds[r]
            n = min(end, ro + rn) - pos
            segs[r].append(Segment(i, pos - ro, pos - s.offset, n))
            pos += n
            r += 1
    reads = tuple(Read(o, n, tuple(sg)) for (o, n), sg in zip(bounds, segs))
    return LoadPlan(tuple(srcs), reads, chunk)


def _vector_values(p, raw: dict[str, np.ndarray]) -> np.ndarray:
    """cuda_weights._host_vector from gathered bytes: float32 (n,), sources at their rows."""
    out = np.zeros(p.shape[0], dtype=np.float32)
    for name, row0 in p.sources:
        data, t, shape = raw[name]
        v = dequantize(data, t, shape).reshape(-1)
        out[row0:row0 + v.size] = v
    return out


def run_load(plan: LoadPlan, stager, sink, depth: int | None = None) -> int:
    """Read every plan read through `stager` (at most `depth` in flight: n_buffers - 1 by default,
    so one buffer is being released while the others fill) and hand the bytes to `sink`.
    Returns the bytes read from the file."""
    reads = plan.reads
    depth = max(1, stager.n_buffers - 1) if depth is None else depth
    left = [s.nbytes for s in plan.sources]
    host: dict[int, np.ndarray] = {}                  # vector source -> gathered bytes
    vec_raw: dict[tuple[int, str], dict] = {}         # (block, role) -> name -> (bytes, type, shape)
    tickets = [stager.submit(r.offset, r.nbytes) for r in reads[:depth]]
    for i, r in enumerate(reads):
        view = stager.wait(tickets[i])
        for sg in r.segments:
            s = plan.sources[sg.source]
            part = view[sg.read_off:sg.read_off + sg.nbytes]
            if s.is_vector:
                buf = host.setdefault(sg.source, np.empty(s.nbytes, np.uint8))
                buf[sg.src_off:sg.src_off + sg.nbytes] = part
            elif _repacked(s.ggml_type):
                sink.stage(part, sg.src_off)
            else:
                for u in s.uses:
                    sink.copy(part, u.block, u.piece.offset + u.row0 * row_nbytes(s.ggml_type,
                                                                                   s.shape[-1]) + sg.src_off)
            left[sg.source] -= sg.nbytes
            if left[sg.source]:
                continue
            if s.is_vector:                           # complete: convert once all its piece's are in
                data = host.pop(sg.source)
                for u in s.uses:
                    got = vec_raw.setdefault((u.block, u.piece.role), {})
                    got[s.name] = (data, s.ggml_type, s.shape)
                    if len(got) == len(u.piece.sources):
                        sink.vector(u.block, u.piece, _vector_values(u.piece, got))
            elif _repacked(s.ggml_type):
                for u in s.uses:
                    sink.repack(u.block, u.piece, s, u.row0)
        stager.release(tickets[i], ready=sink.fence())
        tickets[i] = None
        if i + depth < len(reads):
            nxt = reads[i + depth]
            tickets.append(stager.submit(nxt.offset, nxt.nbytes))
    sink.finish()
    return plan.bytes_read


def _repacked(t) -> bool:
    from aircupy.cuda.ops.packing import needs_repack
    return needs_repack(t)


class HostSink:
    """numpy twin of CudaSink: blocks are numpy uint8 arrays; repack follows ops.repack's layout
    (bodies at row0's blocks, heads in the stacked tensor's heads region)."""

    def __init__(self, blocks, staging_bytes: int):
        self.blocks, self.staging = blocks, np.empty(staging_bytes, np.uint8)

    def copy(self, part, block, off):
        self.blocks[block][off:off + part.nbytes] = part

    def stage(self, part, off):
        self.staging[off:off + part.nbytes] = part

    def repack(self, block, piece, s: Source, row0: int):
        from aircupy.cuda.ops.packing import HEADERS, heads_offset
        be, bb = BLOCK_GEOMETRY[s.ggml_type]
        (total, k), rows = piece.shape, int(np.prod(s.shape[:-1]))
        nb, (off, hb) = k // be, HEADERS[s.ggml_type]
        blocks = self.staging[:s.nbytes].reshape(rows * nb, bb)
        dst = self.blocks[block][piece.offset:piece.offset + piece.nbytes]
        b0 = row0 * nb * (bb - hb)
        body = dst[b0:b0 + rows * nb * (bb - hb)].reshape(rows * nb, bb - hb)
        body[:, :off], body[:, off:] = blocks[:, :off], blocks[:, off + hb:]
        h0 = heads_offset(s.ggml_type, (total, k)) + row0 * nb * hb
        dst[h0:h0 + rows * nb * hb].reshape(rows * nb, hb)[...] = blocks[:, off:off + hb]

    def vector(self, block, piece, values):
        self.blocks[block][piece.offset:piece.offset + values.nbytes] = values.view(np.uint8)

    def fence(self):
        return None

    def finish(self):
        pass


class CudaSink:
    """Uploads on `stream`: DMAs from the pinned read buffers, repacks from `staging` (device
    uint8, >= the largest repacked tensor), vectors as small pageable copies (like fill)."""

    def __init__(self, blocks, staging, lib, stream):
        self.blocks, self.staging, self.lib, self.stream = blocks, staging, lib, stream

    def copy(self, part, block, off):
        self.blocks[block][off:off + part.nbytes].data.copy_from_host_async(
            part.ctypes.data, part.nbytes, self.stream)

    def stage(self, part, off):
        self.staging[off:off + part.nbytes].data.copy_from_host_async(
            part.ctypes.data, part.nbytes, self.stream)

    def repack(self, block, piece, s: Source, row0: int):
        from aircupy.cuda import ops
        dst = self.blocks[block][piece.offset:piece.offset + piece.nbytes]
        stage = self.staging[:s.nbytes]
        with self.stream:      # the same calls as cuda_weights.fill: same packed bytes
            if len(piece.sources) == 1:
                ops.repack(self.lib, stage, dst, s.ggml_type, s.shape)
            else:
                ops.repack(self.lib, stage, dst, s.ggml_type, s.shape, row0=row0,
                           dst_rows=piece.shape[0])

    def vector(self, block, piece, values):
        dst = self.blocks[block][piece.offset:piece.offset + piece.nbytes]
        dst[:values.nbytes].view(np.float32).set(values, stream=self.stream)

    def fence(self):
        """`ready` for the Stager: the buffer's DMAs (everything queued so far) have finished."""
        import cupy as cp
        ev = cp.cuda.Event(disable_timing=True)
        ev.record(self.stream)
        return ev.synchronize

    def finish(self):
        self.stream.synchronize()


def pinned_alloc(nbytes: int) -> np.ndarray:
    import cupyx
    return cupyx.empty_pinned((nbytes,), dtype=np.uint8)


def start_read_ahead(path, ranges, threads=1) -> "ReadAhead | None":
    """A ReadAhead over `ranges` with `threads` reader threads (0: none, None returned), whose lead
    is at most half the available RAM (so the warmed pages are not evicted before the consumers
    read them) and at most the bytes to read. `threads` may also be a ReadAhead already started
    (by the Engine, over the whole file, before the header was even parsed): it is returned as it
    is; its consumers' waits steer it to the ranges they need.

    One thread by default: on the GPU host (H200, 2026-11-27) whole-file reads by one and by four
    threads of 16 MiB preads averaged the same over 157 pairs (1.82 and 1.81 GB/s), and cold
    starts with four warmer threads were no faster than with one (bench_cold, 4 interleaved reps:
    resident 1.07 vs 1.02 of the bound, streamed 1.07 vs 1.09). An earlier mode that only queued
    posix_fadvise(WILLNEED) hints was the slowest in every cold-TTFT run there (the file system
    did not act on the hints in time) and is gone."""
    from aircupy.stream.read_ahead import ReadAhead
    from aircupy.stream.stager import available_ram
    if isinstance(threads, ReadAhead):
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"read-ahead threads must be an int >= 0 or a ReadAhead, got {threads!r}")
    if threads == 0:
        return None
    total = sum(n for _, n in ranges)
    avail = available_ram() or 2 * total
    return ReadAhead(path, ranges, ahead_bytes=max(CHUNK, min(total, avail // 2)), threads=threads)


def warm_file(path, size: int) -> "ReadAhead":
    """The cold-start warmer over a whole file in file order, started before anything else is
    known of it (the Engine's first step; a model given it reads in about file order)."""
    return start_read_ahead(path, [(0, size)], 1)


def load_blocks(plan: LoadPlan, path, blocks, staging, lib, stream, read_ahead=None,
                n_buffers: int = 4, close_read_ahead: bool = True) -> int:
    """run_load of `plan` into device `blocks` through a ring of n_buffers pinned `plan.chunk`-byte
    buffers (128 MiB by default); returns the bytes read. The stream is synchronized at the end;
    `read_ahead` (started by the caller, its ranges beginning with plan.ranges) is closed here,
    also on an error, unless close_read_ahead is False (the streamer reads on behind it)."""
    from aircupy.stream.stager import Stager
    try:
        with Stager(path, n_buffers=n_buffers, buffer_bytes=plan.chunk, alloc=pinned_alloc,
                    read_ahead=read_ahead) as st:
            return run_load(plan, st, CudaSink(blocks, staging, lib, stream))
    finally:
        if read_ahead is not None and close_read_ahead:
            read_ahead.close()
