"""Staging: file windows -> host buffers (pinned, when the caller allocates them so), off the main thread.

    stager = Stager(path, n_buffers=3, buffer_bytes=plan.slot_bytes, alloc=pinned_alloc)
    t = stager.submit(offset, nbytes, key=layer)    # a reader thread fills a free buffer
    view = stager.wait(t)                           # uint8 (nbytes,) view, filled
    ...copy `view` to the device on a copy stream, record an event...
    stager.release(t, ready=event.synchronize)      # buffer is reused only once `ready()` returned

Why read() into the buffer instead of copying from the mmap: the GPU may only DMA from pinned memory
(pageable copies run at a sixth of the rate and block), so the bytes must land in a pinned buffer
anyway; os.preadv writes them there straight from the page cache (or the disk), one copy instead of
page-fault-driven mmap reads plus a memcpy. posix_fadvise(WILLNEED) on the windows queued behind the
ones being read lets the kernel's readahead fetch them from disk while the current ones are copied.

RAM tier: with `ram_tier_bytes`, a keyed window is read, the first time, into a buffer of its own that
is never reused (while the budget lasts), so later passes skip the disk and the read: `submit` returns
a filled ticket at once. The allocator decides whether that memory is pinned. The tier's buffer is
allocated by the reader thread that fills it, not by the caller: pinning ~120 MB (cudaHostAlloc) takes
tens of milliseconds, which on the caller's thread stalled the first pass of a cold start.

Cold start: ReadAhead (below) reads the file into the page cache ahead of the consumers from t = 0,
before the CUDA context exists, so the disk never idles while the process sets up the GPU; a Stager
given `read_ahead` leaves the disk to it (reads what is cached, waits for the rest) and reports
every window it read, which paces the warmer.

Thread-safety: submit/wait/release are called from the one thread that drives the forward pass; the
reader threads only fill buffers.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Alloc = Callable[[int], np.ndarray]


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of host RAM a new allocation can get without swapping: MemAvailable (free memory plus
    the reclaimable page cache; a model file just read or written sits in the cache and would make
    MemFree look full), else the free pages where /proc is absent; 0 when neither is known."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def numpy_alloc(nbytes: int) -> np.ndarray:
    """Pageable host memory: for tests and the CPU backend; the GPU streamer passes a pinned allocator."""
    return np.empty(nbytes, dtype=np.uint8)


@dataclass
class StagingStats:
    bytes_read: int = 0           # from the file (disk or page cache)
    read_s: float = 0.0           # summed over reader threads
    ram_tier_hits: int = 0
    ram_tier_bytes: int = 0       # held by the RAM tier
    waits: int = 0
    wait_s: float = 0.0           # time the caller spent blocked in wait()

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else 0.0


@dataclass
class Ticket:
    key: object
    offset: int
    nbytes: int
    buffer: int | None            # ring index; None for a RAM-tier hit
    future: Future | None = None
    view: np.ndarray | None = field(default=None, repr=False)


class Stager:
    def __init__(self, path: str | os.PathLike, n_buffers: int, buffer_bytes: int,
                 alloc: Alloc = numpy_alloc, n_threads: int = 2, ram_tier_bytes: int = 0,
                 read_ahead: "ReadAhead | None" = None):
        if n_buffers < 1 or buffer_bytes < 1:
            raise ValueError("need at least one buffer of at least one byte")
        self._fd = os.open(os.fspath(path), os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._alloc = alloc
        self._buffers = [alloc(buffer_bytes) for _ in range(n_buffers)]
        self._free: deque[int] = deque(range(n_buffers))
        self._pending_release: deque[tuple[int, Callable[[], object] | None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="aircupy-read")
        self._ram: dict[object, np.ndarray | Future] = {}   # a Future while its first read runs
        self.ram_tier_capacity = ram_tier_bytes   # bytes the tier may hold (what fits is kept)
        self._lock = threading.Lock()       # guards stats updated from reader threads
        self.buffer_bytes, self.n_buffers = buffer_bytes, n_buffers
        self.read_ahead = read_ahead
        self.stats = StagingStats()

    # -- the caller's side ---------------------------------------------------------------------
    def prefetch(self, offset: int, nbytes: int) -> None:
        """Hint the kernel to start reading a window that will be submitted later."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def submit(self, offset: int, nbytes: int, key: object = None) -> Ticket:
        """Queue the read of file bytes [offset, offset+nbytes) into a free buffer.

        Blocks only when every buffer is still held (submitted and not yet released); the caller
        sizes the ring so that this does not happen in steady state.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self._size:
            raise ValueError(f"window [{offset}, {offset + nbytes}) is outside the file ({self._size} bytes)")
        if key is not None and key in self._ram:
            with self._lock:
                self.stats.ram_tier_hits += 1
            held = self._ram[key]
            if isinstance(held, Future):
                if not held.done():             # its first read is still running: share it
                    return Ticket(key, offset, nbytes, None, future=held)
                held = self._ram[key] = held.result()
            return Ticket(key, offset, nbytes, None, view=held[:nbytes])
        if key is not None and self.stats.ram_tier_bytes + nbytes <= self.ram_tier_capacity:
            # First read of this window: the reader thread allocates its tier buffer and fills it.
            self.stats.ram_tier_bytes += nbytes
            fut = self._pool.submit(self._alloc_and_read, offset, nbytes)
            self._ram[key] = fut
            return Ticket(key, offset, nbytes, None, future=fut)
        if nbytes > self.buffer_bytes:
            raise ValueError(f"window of {nbytes} bytes exceeds the {self.buffer_bytes}-byte buffers")
        idx = self._take_buffer()
        t = Ticket(key, offset, nbytes, idx)
        t.future = self._pool.submit(self._read, self._buffers[idx], offset, nbytes)
        return t

    def wait(self, t: Ticket) -> np.ndarray:
        """The filled bytes of ticket `t` as a uint8 view (nbytes,)."""
        if t.view is None:
            t0 = time.perf_counter()
            filled = t.future.result()          # the tier buffer, or None for a ring buffer
            dt = time.perf_counter() - t0
            with self._lock:
                self.stats.waits += 1
                self.stats.wait_s += dt
            src = self._buffers[t.buffer] if t.buffer is not None else filled
            t.view = src[:t.nbytes]
        return t.view

    def release(self, t: Ticket, ready: Callable[[], object] | None = None) -> None:
        """Give `t`'s buffer back; it is refilled only after `ready()` (e.g. the upload's
        event.synchronize) has returned. A RAM-tier ticket holds no ring buffer."""
        if t.buffer is not None:
            self._pending_release.append((t.buffer, ready))
            t.buffer = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Stager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _take_buffer(self) -> int:
        while not self._free:
            if not self._pending_release:
                raise RuntimeError("every staging buffer is held: release tickets before submitting more")
            idx, ready = self._pending_release.popleft()
            if ready is not None:
                ready()
            self._free.append(idx)
        # Buffers whose upload has surely finished could be recycled too, but waiting on the oldest
        # first keeps the order of reuse equal to the order of release, which is what the copy
        # stream completes in.
        return self._free.popleft()

    def _alloc_and_read(self, offset: int, nbytes: int) -> np.ndarray:
        buf = self._alloc(nbytes)
        self._read(buf, offset, nbytes)
        return buf

    def _read(self, buf: np.ndarray, offset: int, nbytes: int) -> None:
        t0 = time.perf_counter()
        mv = memoryview(buf)[:nbytes]
        done = 0
        ra = self.read_ahead
        if ra is not None and not ra.passed(offset, nbytes):
            # The warmer is the disk's only reader: take what the page cache holds (a warm
            # start), wait for the warmer to pass the rest, then copy that from the cache.
            done = read_cached(self._fd, mv, offset)
            if done < nbytes:
                ra.wait_for(offset + done, nbytes - done)
        while done < nbytes:
            n = os.preadv(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read at byte {offset + done} of the model file")
            done += n
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.read_s += dt
        if ra is not None:
            ra.covered(offset, nbytes)
            ra.consumed(nbytes)


class ReadAhead:
    """Reads `ranges` (file (offset, nbytes), in the order the consumers will read them) into the
    page cache from `threads` background threads (default one), starting at once, and is the only
    reader of the disk until it is done: a Stager given it reads a window that the warmer has not
    passed yet only from the page cache (preadv2 RWF_NOWAIT), and otherwise waits for the warmer to
    pass it, then copies it from the cache.

        ra = ReadAhead(path, [(off, n), ...], ahead_bytes=2 << 30)
        ... set up the GPU (context, pool, kernels) while the disk reads ...
        stager = Stager(path, ..., read_ahead=ra)     # its preadvs hit the page cache
        ra.close()

    Why (issue 5: TTFT from a cold page cache within 10% of size / disk rate): the disk must read
    from the first millisecond to the last, in one sequential stream. The consumers (the staged
    resident load, the streamer's first pass) start late (after the CUDA context, the pool and
    NVRTC) and pause (uploads, repacks, the prefill); and once they caught up with an earlier
    warmer that only read ahead, their own reader threads hit the disk beside it. On the GPU host
    (H200, 2026-11-27) one thread of 16 MiB preads read the file at 1.34-1.52 GB/s and four at
    1.18-1.44, and cold loads with warmer and consumers both reading ran the disk at about 1.2 GB/s.

    Pacing: the warmer stays at most `ahead_bytes` ahead of what the consumers reported through
    consumed(), so a file larger than RAM does not evict its own first windows before they are
    used; a consumer waiting on a piece lifts that limit up to the piece. Pieces a consumer
    already read from a warm cache (covered()) are skipped. Each piece read costs one memcpy
    (page cache -> scratch) on an otherwise idle core.
    """

    def __init__(self, path: str | os.PathLike, ranges, ahead_bytes: int = 2 << 30,
                 piece: int = 16 << 20, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.ranges = [(int(o), int(n)) for o, n in ranges if n > 0]
        self.total = sum(n for _, n in self.ranges)
        self.ahead_bytes, self.piece = int(ahead_bytes), int(piece)
        # Pieces in reading order; (start, seq) sorted by start to find a window's pieces.
        self._pieces = [(o, min(self.piece, off + n - o)) for off, n in self.ranges
                        for o in range(off, off + n, self.piece)]
        self._starts = [0] * (len(self._pieces) + 1)       # bytes of the ranges before piece k
        for k, (_, m) in enumerate(self._pieces):
            self._starts[k + 1] = self._starts[k] + m
        by_start = sorted(range(len(self._pieces)), key=lambda k: self._pieces[k][0])
        self._index = ([self._pieces[k][0] for k in by_start], by_start)
        self.bytes_read = 0           # by the warmer's threads
        self.read_s = 0.0             # wall time of their reading (waits excluded), summed
        # perf_counter() at the start and at the first and last read's end (None: no such read):
        # a cold start's disk phase, for bench/bench_cold.py
        self.started_at, self.first_read_at, self.last_read_at = time.perf_counter(), None, None
        self.error: BaseException | None = None
        self._next = 0                # next piece a warmer thread takes
        self._done = bytearray(len(self._pieces))
        self._covered = bytearray(len(self._pieces))
        self._prefix = 0              # every piece before this one is done
        self._demand = -1             # the highest piece a consumer waits for
        self._consumed = 0
        self._stop = False
        self._running = threads
        self._cv = threading.Condition()
        self._fd = os.open(os.fspath(path), os.O_RDONLY)   # the threads' own; the last closes it
        self._threads = [threading.Thread(target=self._run, name=f"aircupy-readahead{k}",
                                          daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def position(self) -> int:
        """Bytes of the ranges the warmer has passed (read, skipped or being read)."""
        return self._starts[self._next]

    @property
    def done(self) -> bool:
        """The warmer has stopped: every range passed, close() called, or a read failed."""
        return self._running == 0

    def consumed(self, nbytes: int) -> None:
        """The consumers have read `nbytes` more of the ranges (any order; only the sum paces)."""
        with self._cv:
            self._consumed += nbytes
            self._cv.notify_all()

    def passed(self, offset: int, nbytes: int) -> bool:
        """Whether file bytes [offset, offset+nbytes) need no wait: the warmer read every piece
        of them, or has stopped (the consumer then reads on its own)."""
        last = self._last_piece(offset, nbytes)
        return last < 0 or self._prefix > last or self._running == 0

    def wait_for(self, offset: int, nbytes: int) -> None:
        """Block until passed(offset, nbytes); the ahead_bytes limit does not hold the pieces up."""
        last = self._last_piece(offset, nbytes)
        if last < 0:
            return
        with self._cv:
            if last > self._demand:
                self._demand = last
                self._cv.notify_all()
            while self._prefix <= last and self._running:
                self._cv.wait()

    def covered(self, offset: int, nbytes: int) -> None:
        """A consumer has read [offset, offset+nbytes): pieces wholly inside need no warming."""
        starts, seqs = self._index
        lo = bisect.bisect_left(starts, offset)
        hi = bisect.bisect_left(starts, offset + nbytes)
        for j in range(lo, hi):
            o, m = self._pieces[seqs[j]]
            if o + m <= offset + nbytes:
                self._covered[seqs[j]] = 1

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _last_piece(self, offset: int, nbytes: int) -> int:
        """The highest reading-order index of the pieces that overlap the window; -1 for none."""
        starts, seqs = self._index
        lo = bisect.bisect_left(starts, offset - self.piece + 1)
        hi = bisect.bisect_left(starts, offset + nbytes)
        return max((seqs[j] for j in range(lo, hi)
                    if self._pieces[seqs[j]][0] + self._pieces[seqs[j]][1] > offset), default=-1)

    def _run(self) -> None:
        buf = np.empty(min(self.piece, max((m for _, m in self._pieces), default=1)), np.uint8)
        mv = memoryview(buf)
        try:
            while True:
                with self._cv:
                    while (not self._stop and self._next < len(self._pieces)
                           and self._starts[self._next] - self._consumed >= self.ahead_bytes
                           and self._next > self._demand):
                        self._cv.wait()
                    if self._stop or self._next >= len(self._pieces):
                        return
                    k = self._next
                    self._next += 1
                if not self._covered[k]:
                    o, m = self._pieces[k]
                    t0 = time.perf_counter()
                    got = os.preadv(self._fd, [mv[:m]], o)
                    t1 = time.perf_counter()
                    with self._cv:
                        self.read_s += t1 - t0
                        self.bytes_read += max(got, 0)
                        self.first_read_at = self.first_read_at or t1
                        self.last_read_at = t1
                    if got <= 0:
                        return             # past the end: the consumers report the error
                with self._cv:
                    self._done[k] = 1
                    while self._prefix < len(self._done) and self._done[self._prefix]:
                        self._prefix += 1
                    self._cv.notify_all()
        except OSError as e:               # the consumers' own reads still run
            self.error = e
        finally:
            with self._cv:
                self._stop = self._stop or self.error is not None
                self._running -= 1
                if self._running == 0:
                    os.close(self._fd)
                self._cv.notify_all()


def read_cached(fd: int, mv: memoryview, offset: int) -> int:
    """Bytes of `mv` filled from file offset `offset` out of the page cache alone (preadv2 with
    RWF_NOWAIT: it stops at the first page that would need the disk); 0 where the flag is
    unsupported."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return 0
    done = 0
    while done < len(mv):
        try:
            n = os.preadv(fd, [mv[done:]], offset + done, flag)
        except OSError:               # EAGAIN: not cached; EOPNOTSUPP/EINVAL: no such reads here
            break
        if n <= 0:
            break
        done += n
    return done
