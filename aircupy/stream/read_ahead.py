"""The cold-start page-cache warmer: a child process that is the disk's only reader while a model
starts (ReadAhead), and the page-cache-only read the consumers try first (read_cached).

A Stager (stream/stager.py) given a ReadAhead copies what the page cache holds, waits for the
warmer to read the rest, and reports what it read (consumed, covered), which paces and steers the
warmer. cuda/load.start_read_ahead sizes one for a model's reads; the Engine starts one over
the whole file before it parses the header (cuda/backend.start_warmer).
"""
from __future__ import annotations

import bisect
import os
import threading
import time


class ReadAhead:
    """Reads `ranges` (file (offset, nbytes), in the order the consumers will read them) into the
    page cache from a child process (stream/_warm_child.py; `threads` reader threads there, default
    one), starting at once, and is the only reader of the disk until it is done: a Stager given it
    reads a window that the warmer has not passed yet only from the page cache (preadv2
    RWF_NOWAIT), and otherwise waits for the warmer to pass it, then copies it from the cache.

        ra = ReadAhead(path, [(off, n), ...], ahead_bytes=2 << 30)
        ... set up the GPU (context, pool, kernels) while the disk reads ...
        stager = Stager(path, ..., read_ahead=ra)     # its preadvs hit the page cache
        ra.close()

    Why (a cold start's TTFT should be the disk's time for the file): the disk must read from the
    first millisecond to the last, in one sequential stream. The consumers (the staged resident
    load, the streamer's first pass) start late (after the CUDA context, the pool and NVRTC) and
    pause (uploads, repacks, the prefill); once they caught up with a warmer that only read ahead,
    their reader threads hit the disk beside it, and the disk lost its rate (bench/RESULTS.md, cold
    start). A warmer thread in the model's process ran at half the disk's rate while the main thread
    started the GPU: it needs the GIL between reads. The child has its own.

    Order and pace: pieces are read in `ranges` order, at most `ahead_bytes` ahead of what the
    consumers reported through consumed() (a file larger than RAM does not evict its own first
    windows before they are used). A piece a consumer waits for (ask, wait_for) is read next if it
    lies `near_bytes` or more ahead of the reading cursor, whatever the order and the pace, so any
    consumer order is served; a nearer one is read in turn, the pace lifted until it is (the
    disk's rate holds only on one sequential stream: stream/_warm_child.py). 1 GiB by default:
    two windows of a 70B Q4_0 layer (0.46 GB each; a streamer's two reader threads hold two), and
    half a second of this host's disk. Pieces a consumer already read from a warm cache
    (covered()) are skipped. Each piece read costs one copy (page cache -> the child's
    buffer) on an otherwise idle core. Should the child fail to start or die, the warmer counts as
    done and the consumers read the file themselves.
    """

    def __init__(self, path: str | os.PathLike, ranges, ahead_bytes: int = 2 << 30,
                 piece: int = 16 << 20, threads: int = 1, near_bytes: int = 1 << 30):
        import subprocess
        import sys
        from aircupy.stream._warm_child import pieces_of
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.ranges = [(int(o), int(n)) for o, n in ranges if n > 0]
        self.ahead_bytes, self.piece = int(ahead_bytes), int(piece)
        self._pieces = pieces_of(self.ranges, self.piece)
        by_start = sorted(range(len(self._pieces)), key=lambda k: self._pieces[k][0])
        self._index = ([self._pieces[k][0] for k in by_start], by_start)
        self._done = bytearray(len(self._pieces))
        self._asked = bytearray(len(self._pieces))   # demanded or reported covered already
        self.position = 0             # bytes of the pieces passed (read or skipped)
        self.bytes_read = 0           # by the warmer
        self.error: BaseException | None = None
        # perf_counter() at the start and when the last piece read was reported (None: none yet):
        # a cold start's disk phase, for bench/bench_cold.py
        self.started_at, self.last_read_at = time.perf_counter(), None
        self._consumed = 0
        self._cv = threading.Condition()
        self._wlock = threading.Lock()
        self._alive = bool(self._pieces)
        self._proc = self._listener = None
        if not self._alive:
            return
        child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_warm_child.py")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", child, os.fspath(path), str(self.piece),
                 str(self.ahead_bytes), str(int(threads)), str(int(near_bytes))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as e:          # no warmer: the consumers read on their own
            self.error, self._alive = e, False
            return
        self._send("".join(f"R {o} {n}\n" for o, n in self.ranges) + "G\n")
        self._listener = threading.Thread(target=self._listen, name="aircupy-readahead",
                                          daemon=True)
        self._listener.start()

    @property
    def done(self) -> bool:
        """The warmer has stopped: every piece passed, close() called, or it failed."""
        return not self._alive

    def wait_done(self) -> None:
        """Block until the warmer has stopped (done)."""
        with self._cv:
            while self._alive:
                self._cv.wait()

    def consumed(self, nbytes: int) -> None:
        """The consumers have read `nbytes` more of the ranges (any order; only the sum paces)."""
        with self._wlock:
            self._consumed += nbytes
            total = self._consumed
        self._send(f"C {total}\n")

    def passed(self, offset: int, nbytes: int) -> bool:
        """Whether file bytes [offset, offset+nbytes) need no wait: the warmer read every piece
        of them, or has stopped (the consumer then reads on its own)."""
        return not self._alive or all(self._done[k] for k in self._overlapping(offset, nbytes))

    def ask(self, offset: int, nbytes: int) -> list[int]:
        """A consumer will wait for [offset, offset+nbytes): its pieces not read yet are asked for
        (in file order, so a far window is read as one stretch). Returns those pieces."""
        ks = [k for k in self._overlapping(offset, nbytes) if not self._done[k]]
        ask = [k for k in ks if not self._asked[k]]
        for k in ask:
            self._asked[k] = 1
        if ask:
            self._send("".join(f"D {k}\n" for k in ask))
        return ks

    def wait_for(self, offset: int, nbytes: int) -> None:
        """Block until passed(offset, nbytes), asking for the pieces (ask) first."""
        ks = self.ask(offset, nbytes)
        with self._cv:
            while self._alive and not all(self._done[k] for k in ks):
                self._cv.wait()

    def covered(self, offset: int, nbytes: int) -> None:
        """A consumer has read [offset, offset+nbytes): pieces wholly inside need no warming."""
        ks = [k for k in self._overlapping(offset, nbytes)
              if self._pieces[k][0] >= offset and sum(self._pieces[k]) <= offset + nbytes
              and not self._done[k] and not self._asked[k]]
        if ks and self._alive:
            for k in ks:
                self._asked[k] = 1
            self._send("".join(f"V {k}\n" for k in ks))

    def close(self) -> None:
        """Stop the child (it ends at its current piece) and wait for it."""
        p = self._proc
        if p is not None:
            with self._wlock:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            try:
                p.wait(timeout=10)
            except Exception:
                p.kill()
                p.wait()
        if self._listener is not None:
            self._listener.join()
        with self._cv:
            self._alive = False
            self._cv.notify_all()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _overlapping(self, offset: int, nbytes: int) -> list[int]:
        """Reading-order indices of the pieces that overlap [offset, offset+nbytes)."""
        starts, seqs = self._index
        lo = bisect.bisect_left(starts, offset - self.piece + 1)
        hi = bisect.bisect_left(starts, offset + nbytes)
        return [seqs[j] for j in range(lo, hi) if sum(self._pieces[seqs[j]]) > offset]

    def _send(self, text: str) -> None:
        with self._wlock:
            try:
                self._proc.stdin.write(text.encode())
                self._proc.stdin.flush()
            except (OSError, ValueError, AttributeError):   # the child is gone, or closed
                pass

    def _listen(self) -> None:
        try:
            for raw in self._proc.stdout:
                line = raw.decode().strip()
                if line.startswith("E "):
                    self.error = OSError(f"page-cache warmer: {line[2:]}")
                    continue
                k, n = (int(x) for x in line.split())
                now = time.perf_counter()
                with self._cv:
                    self._done[k] = 1
                    self.position += self._pieces[k][1]
                    if n:
                        self.bytes_read += n
                        self.last_read_at = now
                    self._cv.notify_all()
        finally:
            self._proc.stdout.close()
            with self._cv:
                self._alive = False
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
