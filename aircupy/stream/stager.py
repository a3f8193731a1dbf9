"""Staging: file windows -> host buffers (pinned, when the caller allocates them so), off the main thread.

    stager = Stager(path, n_buffers=3, buffer_bytes=plan.slot_bytes, alloc=pinned_alloc)
    t = stager.submit(offset, nbytes, key=layer)    # a reader thread fills a free buffer
    view = stager.wait(t)                           # uint8 (nbytes,) view, filled
    ...copy `view` to the device on a copy stream, record an event...
    stager.release(t, ready=event.synchronize)      # buffer is reused only once `ready()` returned

Why read() into the buffer instead of copying from the mmap: the GPU may only DMA from pinned memory
(pageable copies run at a sixth of the rate and block), so the bytes must land in a pinned buffer
anyway; os.preadv writes them there straight from the page cache (or the disk), one copy instead of
page-fault-driven mmap reads plus a memcpy.

Pinning is slow and serial: cudaHostAlloc runs at a few GB/s, and two threads pinning at once each
take twice as long. So one "pin" thread does all of it, off the
caller's thread: the ring first (at construction; a read waits only for its own buffer), then the
RAM tier.

RAM tier: with `ram_tier_bytes`, a keyed window gets a buffer of its own that is never reused (while
the budget lasts), so later passes skip the disk and the read: `submit` returns a filled ticket at
once. The first read of a window goes through the ring like any other, and the tier's copy (pinning
+ a read, from the page cache by then) is made behind it on the pin thread, used from the first
submit after it is complete: a cold start's first pass is paced by the disk, not by pinning (an 8B
model's 3.9 GB tier is, at that rate, 2.2 s of pinning: longer than the disk takes to read the file).
With `defer_tier` the copies also wait for start_tier(). The allocator decides whether that memory
is pinned.

Cold start: a ReadAhead (stream/read_ahead.py) reads the file into the page cache ahead of the
consumers from t = 0, before the CUDA context exists, so the disk never idles while the process sets
up the GPU; a Stager given `read_ahead` leaves the disk to it (reads what is cached, waits for the
rest) and reports every window it read, which paces the warmer.

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
from typing import TYPE_CHECKING, Callable

import numpy as np

from aircupy.stream.read_ahead import read_cached

if TYPE_CHECKING:
    from aircupy.stream.read_ahead import ReadAhead

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
                 read_ahead: "ReadAhead | None" = None, defer_tier: bool = False):
        """defer_tier: RAM-tier copies wait for start_tier() (the streamer calls it when its second
        pass begins, the first token out): a cold start's first pass runs without pinning beside
        it (pinning holds a driver lock its uploads and launches would queue on). Not also at the
        warmer's end: on a cold start that is the first pass's last tenth of a second, and the
        first pinning held up its last layers, head and sampling (bench/RESULTS.md, cold start)."""
        if n_buffers < 1 or buffer_bytes < 1:
            raise ValueError("need at least one buffer of at least one byte")
        self._fd = os.open(os.fspath(path), os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._alloc = alloc
        # One thread allocates the ring (now, off the caller's thread: pinning is slow) and then
        # fills the RAM tier, behind the reads; the reader threads only read.
        self._pin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aircupy-pin")
        self._buffers = [self._pin.submit(alloc, buffer_bytes) for _ in range(n_buffers)]
        self._free: deque[int] = deque(range(n_buffers))
        self._pending_release: deque[tuple[int, Callable[[], object] | None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="aircupy-read")
        self._ram: dict[object, np.ndarray | Future] = {}   # a Future while its tier copy is made
        self.ram_tier_capacity = ram_tier_bytes   # bytes the tier may hold (what fits is kept)
        self._lock = threading.Lock()       # guards stats updated from reader threads
        self.buffer_bytes, self.n_buffers = buffer_bytes, n_buffers
        self.read_ahead = read_ahead
        self._cache_missed = False          # a read_cached came back short (cold start)
        self._tier_go, self._closing = threading.Event(), False
        if not defer_tier:
            self._tier_go.set()
        self.stats = StagingStats()

    # -- the caller's side ---------------------------------------------------------------------
    def submit(self, offset: int, nbytes: int, key: object = None) -> Ticket:
        """Queue the read of file bytes [offset, offset+nbytes) into a free buffer.

        A keyed window whose RAM-tier copy is complete is returned at once (a filled ticket). One
        not in the tier yet, while the tier has room, is read into a ring buffer as usual, and its
        tier copy (allocation + read) is queued behind, on the pinning thread: the pass that first
        reads a window (a cold start's) never waits for the slow pinning of the tier's memory.

        Blocks only when every buffer is still held (submitted and not yet released); the caller
        sizes the ring so that this does not happen in steady state.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self._size:
            raise ValueError(f"window [{offset}, {offset + nbytes}) is outside the file ({self._size} bytes)")
        if key is not None:
            held = self._ram.get(key)
            if isinstance(held, Future) and held.done() and held.exception() is None:
                held = self._ram[key] = held.result()
            if isinstance(held, np.ndarray):
                with self._lock:
                    self.stats.ram_tier_hits += 1
                return Ticket(key, offset, nbytes, None, view=held[:nbytes])
            if held is None and self.stats.ram_tier_bytes + nbytes <= self.ram_tier_capacity:
                self.stats.ram_tier_bytes += nbytes
                self._ram[key] = self._pin.submit(self._alloc_and_read, offset, nbytes)
        if nbytes > self.buffer_bytes:
            raise ValueError(f"window of {nbytes} bytes exceeds the {self.buffer_bytes}-byte buffers")
        idx = self._take_buffer()
        t = Ticket(key, offset, nbytes, idx)
        t.future = self._pool.submit(self._read_into, idx, offset, nbytes)
        return t

    def wait(self, t: Ticket) -> np.ndarray:
        """The filled bytes of ticket `t` as a uint8 view (nbytes,)."""
        if t.view is None:
            t0 = time.perf_counter()
            t.future.result()
            dt = time.perf_counter() - t0
            with self._lock:
                self.stats.waits += 1
                self.stats.wait_s += dt
            t.view = self._buffers[t.buffer].result()[:t.nbytes]
        return t.view

    def release(self, t: Ticket, ready: Callable[[], object] | None = None) -> None:
        """Give `t`'s buffer back; it is refilled only after `ready()` (e.g. the upload's
        event.synchronize) has returned. A RAM-tier ticket holds no ring buffer."""
        if t.buffer is not None:
            self._pending_release.append((t.buffer, ready))
            t.buffer = None

    def start_tier(self) -> None:
        """Let deferred RAM-tier copies run (idempotent)."""
        self._tier_go.set()

    def tier_settled(self) -> None:
        """Start the RAM-tier copies (if deferred) and wait until every queued one is made
        (tests, benchmarks: steady state)."""
        self.start_tier()
        for held in list(self._ram.values()):
            if isinstance(held, Future):
                held.exception()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._closing = True                # before the release: a waiting tier copy returns at once
        self._tier_go.set()
        self._pin.shutdown(wait=True, cancel_futures=True)
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

    def _read_into(self, idx: int, offset: int, nbytes: int) -> None:
        self._read(self._buffers[idx].result(), offset, nbytes)

    def _alloc_and_read(self, offset: int, nbytes: int) -> np.ndarray | None:
        self._tier_go.wait()                # start_tier(), or close() (then _closing is set)
        if self._closing:
            return None
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
            # start), wait for the warmer to pass the rest, then copy that from the cache. Only
            # until the cache first lacks a page: a miss starts the kernel's own readahead there,
            # I/O beside the warmer's, so a cold start waits from then on.
            if not self._cache_missed:
                done = read_cached(self._fd, mv, offset)
                self._cache_missed = done < nbytes
            # Piece by piece behind the warmer: when it reads the window's last byte, only that
            # piece is left to copy. The whole window is asked for first (one stretch if far).
            ra.ask(offset + done, nbytes - done)
            while done < nbytes:
                step = min(nbytes - done, ra.piece)
                ra.wait_for(offset + done, step)
                n = os.preadv(self._fd, [mv[done:done + step]], offset + done)
                if n <= 0:
                    raise OSError(f"short read at byte {offset + done} of the model file")
                done += n
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
