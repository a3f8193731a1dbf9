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

Cold start: ReadAhead (below) reads the file ahead of the consumers from t = 0, before the CUDA
context exists, so the disk never idles while the process sets up the GPU; a Stager given
`read_ahead` reports every window it read to it, which paces the warmer.

Thread-safety: submit/wait/release are called from the one thread that drives the forward pass; the
reader threads only fill buffers.
"""
from __future__ import annotations

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
            if self.read_ahead is not None:
                self.read_ahead.claimed(nbytes)
            fut = self._pool.submit(self._alloc_and_read, offset, nbytes)
            self._ram[key] = fut
            return Ticket(key, offset, nbytes, None, future=fut)
        if nbytes > self.buffer_bytes:
            raise ValueError(f"window of {nbytes} bytes exceeds the {self.buffer_bytes}-byte buffers")
        if self.read_ahead is not None:
            self.read_ahead.claimed(nbytes)
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
        while done < nbytes:
            n = os.preadv(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read at byte {offset + done} of the model file")
            done += n
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.read_s += dt
        if self.read_ahead is not None:
            self.read_ahead.consumed(nbytes)


class ReadAhead:
    """Warms the page cache over `ranges` (file (offset, nbytes), in the order the consumers will
    read them) from one background thread, starting at once.

        ra = ReadAhead(path, [(off, n), ...], ahead_bytes=2 << 30)
        ... set up the GPU (context, pool, kernels) while the disk reads ...
        stager = Stager(path, ..., read_ahead=ra)     # its preadvs now mostly hit the page cache
        ra.close()

    Why: on a cold start the disk is the bound (issue 5: TTFT within 10% of size / disk rate), so
    it must read from the first millisecond to the last without a pause; the consumers (the staged
    resident load, the streamer's first pass) start late (after CUDA context creation, the pool,
    NVRTC) and pause (uploads, repacks, the prefill). This thread reads `piece`-byte preads into
    one reusable buffer, one thread of 16 MiB reads being what bench_cold.disk_rate measures as
    the disk rate. It stays at most `ahead_bytes` ahead of what the consumers reported through
    consumed(), so a file larger than RAM does not evict its own first windows before they are
    used, and skips the pieces the consumers have already queued (claimed()): once they have
    caught up, their own reads fetch those bytes, and a second reader would only add seeks. Its reads cost one extra memcpy per byte (page cache ->
    scratch) on an otherwise idle core.
    """

    def __init__(self, path: str | os.PathLike, ranges, ahead_bytes: int = 2 << 30,
                 piece: int = 16 << 20, mode: str = "read"):
        if mode not in ("read", "fadvise"):
            raise ValueError(f"mode must be 'read' or 'fadvise', got {mode!r}")
        self.mode = mode if hasattr(os, "posix_fadvise") else "read"
        self.ranges = [(int(o), int(n)) for o, n in ranges if n > 0]
        self.total = sum(n for _, n in self.ranges)
        self.ahead_bytes, self.piece = int(ahead_bytes), int(piece)
        self.position = 0             # bytes of the ranges passed (read or skipped)
        self.bytes_read = 0           # by this thread
        self.read_s = 0.0             # wall time of this thread's reading (waits excluded)
        self.error: BaseException | None = None
        self._consumed = 0
        self._claimed = 0
        self._stop = False
        self._cv = threading.Condition()
        self._fd = os.open(os.fspath(path), os.O_RDONLY)   # the thread's own; it closes it
        self._thread = threading.Thread(target=self._run, name="aircupy-readahead", daemon=True)
        self._thread.start()

    def claimed(self, nbytes: int) -> None:
        """The consumers have queued reads of `nbytes` more of the ranges (in about range order:
        byte counts stand for positions)."""
        with self._cv:
            self._claimed += nbytes

    def consumed(self, nbytes: int) -> None:
        """The consumers have read `nbytes` more of the ranges (any order; only the sum paces)."""
        with self._cv:
            self._consumed += nbytes
            self._cv.notify()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        buf = np.empty(min(self.piece, max((n for _, n in self.ranges), default=1)), np.uint8)
        mv = memoryview(buf)
        try:
            for off, n in self.ranges:
                for o in range(off, off + n, self.piece):
                    m = min(self.piece, off + n - o)
                    with self._cv:
                        while not self._stop and self.position - self._consumed >= self.ahead_bytes:
                            self._cv.wait()
                        if self._stop:
                            return
                        skip = self.position + m <= self._claimed
                    self.position += m
                    if skip:
                        continue
                    t0 = time.perf_counter()
                    if self.mode == "fadvise":       # queue the disk reads; no copy, no wait
                        os.posix_fadvise(self._fd, o, m, os.POSIX_FADV_WILLNEED)
                        got = m
                    else:
                        got = os.preadv(self._fd, [mv[:m]], o)
                    self.read_s += time.perf_counter() - t0
                    if got <= 0:
                        return             # past the end: the consumers report the error
                    self.bytes_read += got
        except OSError as e:               # a hint only: the consumers' own reads still run
            self.error = e
        finally:
            os.close(self._fd)
