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
a filled ticket at once. The allocator decides whether that memory is pinned.

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
                 alloc: Alloc = numpy_alloc, n_threads: int = 2, ram_tier_bytes: int = 0):
        if n_buffers < 1 or buffer_bytes < 1:
            raise ValueError("need at least one buffer of at least one byte")
        self._fd = os.open(os.fspath(path), os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._alloc = alloc
        self._buffers = [alloc(buffer_bytes) for _ in range(n_buffers)]
        self._free: deque[int] = deque(range(n_buffers))
        self._pending_release: deque[tuple[int, Callable[[], object] | None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="aircupy-read")
        self._ram: dict[object, np.ndarray] = {}
        self._ram_budget = ram_tier_bytes
        self._lock = threading.Lock()       # guards stats updated from reader threads
        self.buffer_bytes = buffer_bytes
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
            return Ticket(key, offset, nbytes, None, view=self._ram[key][:nbytes])
        if key is not None and self.stats.ram_tier_bytes + nbytes <= self._ram_budget:
            keep = self._alloc(nbytes)          # first read of this window: straight into the tier
            self._ram[key] = keep
            self.stats.ram_tier_bytes += nbytes
            t = Ticket(key, offset, nbytes, None)
            t.future = self._pool.submit(self._read, keep, offset, nbytes)
            return t
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
            t.future.result()
            dt = time.perf_counter() - t0
            with self._lock:
                self.stats.waits += 1
                self.stats.wait_s += dt
            src = self._buffers[t.buffer] if t.buffer is not None else self._ram[t.key]
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
