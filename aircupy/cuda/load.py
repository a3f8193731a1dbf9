"""Staged weight load: the file read in large sequential preads, overlapped with uploads and repacks.

    plan = plan_load([glob_l, layer0_l, ...], g.tensors, g.file_size)    # pure data, no cupy
    with Stager(g.path, n_buffers=4, buffer_bytes=plan.chunk, alloc=pinned) as st:
        run_load(plan, st, CudaSink(blocks, staging, lib, stream))       # blocks[i] <- layouts[i]

Why: a per-tensor upload from the mmap view reads a cold page cache by page faults inside pageable
copies, one tensor at a time, with the disk idle during every upload and repack. Here the disk side
is a Stager ring (reader threads preadv `chunk` bytes, 4 KiB-aligned, in file order, into pinned
buffers) and the device side consumes each filled buffer while the next ones are read: per tensor
segment, a DMA straight into its rows (types the kernels read as stored), or into the device staging
buffer and, once the tensor is complete, a repack into its piece (weights.repack_source); vectors are
gathered on the host and converted by weights.vector_values. A host buffer is refilled only after an
event recorded behind its DMAs (the Stager's `ready`).

Every tensor is read once even when two pieces use it. The device staging holds one tensor at a time:
tensors complete in file order, and a tensor's DMAs and repack sit on one stream, so the next
tensor's DMAs into the staging buffer are ordered behind the previous repack.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from aircupy.gguf.ggml import GGMLType
from aircupy.cuda.weights import direct_offset, repack_source, vector_values
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
                    sink.copy(part, u.block, u.piece.offset + direct_offset(u.piece, u.row0) + sg.src_off)
            left[sg.source] -= sg.nbytes
            if left[sg.source]:
                continue
            if s.is_vector:                           # complete: convert once all its piece's are in
                data = host.pop(sg.source)
                for u in s.uses:
                    got = vec_raw.setdefault((u.block, u.piece.role), {})
                    got[s.name] = (data, s.ggml_type, s.shape)
                    if len(got) == len(u.piece.sources):
                        sink.vector(u.block, u.piece, vector_values(u.piece, got))
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


class CudaSink:
    """Uploads on `stream`: DMAs from the pinned read buffers, repacks from `staging` (device
    uint8, >= the largest repacked tensor), vectors as small pageable copies. Its numpy twin is
    tests/helpers/host_sink.py."""

    def __init__(self, blocks, staging, lib, stream):
        self.blocks, self.staging, self.lib, self.stream = blocks, staging, lib, stream

    def copy(self, part, block, off):
        self.blocks[block][off:off + part.nbytes].data.copy_from_host_async(
            part.ctypes.data, part.nbytes, self.stream)

    def stage(self, part, off):
        self.staging[off:off + part.nbytes].data.copy_from_host_async(
            part.ctypes.data, part.nbytes, self.stream)

    def repack(self, block, piece, s: Source, row0: int):
        dst = self.blocks[block][piece.offset:piece.offset + piece.nbytes]
        repack_source(self.lib, self.staging[:s.nbytes], dst, piece, s.ggml_type, s.shape, row0,
                      self.stream)

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

    One thread by default: more reader threads were measured no faster on a whole-file read or a
    cold start (bench/RESULTS.md, cold start), and one keeps the disk's access sequential."""
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
