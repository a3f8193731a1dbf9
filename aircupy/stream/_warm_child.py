"""The page-cache warmer's reader process: loader.read_ahead.ReadAhead runs this file by path with
`python -I -S`, so it imports the standard library only (no aircupy, no numpy).

Why a process: the warmer must keep the disk busy from the first millisecond to the last. As a
thread of the model's process it needs the GIL between two reads, and the main thread holds it
for long stretches while it starts up (importing cupy, creating the CUDA context, loading kernels,
Python set-up work): each wait left the disk idle. Here nothing else competes for this
interpreter's lock.

    python -I -S _warm_child.py PATH PIECE AHEAD THREADS NEAR

stdin, one command a line: "R off n" a range, in reading order (all of them before "G"); "G" start;
"C total" bytes the consumers have read so far (paces the warmer: it stays at most AHEAD bytes of
pieces ahead of them); "D k" a consumer waits for piece k (see below; whatever the pace); "V k" a
consumer read piece k itself (skip it). End of input: stop. stdout: "k nbytes" per piece read
(nbytes 0: skipped); "E text" on a read error, after which the process stops.

A waited-for piece less than NEAR bytes ahead of the reading cursor is not read out of turn: the
cursor reaches it soon, and the pace is lifted until it does. Only one farther off is read next.
Why: the disk keeps its rate only on one sequential stream. A streamed model's two reader threads
can wait on two windows far apart; reading their pieces as they are asked alternates between the
two places and costs the disk a measurable part of its rate (bench/RESULTS.md, cold start).
"""
import os
import sys
import threading
from collections import deque


def pieces_of(ranges, piece):
    """(offset, nbytes) of every piece of `ranges`, in reading order (ReadAhead's numbering)."""
    return [(o, min(piece, off + n - o)) for off, n in ranges for o in range(off, off + n, piece)]


class Warmer:
    def __init__(self, path, piece, ahead, ranges, near=0):
        self.fd = os.open(path, os.O_RDONLY)
        self.pieces = pieces_of(ranges, piece)
        self.ahead = ahead
        self.near = near // piece     # in pieces: a demand closer than this to `next` is due
        self.due = -1                 # the cursor reads up to this piece whatever the pace
        self.taken = bytearray(len(self.pieces))
        self.covered = bytearray(len(self.pieces))
        self.demand = deque()
        self.next = 0                 # first piece in reading order not known to be taken
        self.taken_bytes = 0
        self.consumed = 0
        self.stop = False
        self.cv = threading.Condition()
        self.out_lock = threading.Lock()

    def emit(self, line):
        with self.out_lock:
            try:
                os.write(1, (line + "\n").encode())
            except OSError:           # the parent is gone
                self.stop = True

    def command(self, line):
        op, _, arg = line.partition(" ")
        with self.cv:
            if op == "C":
                self.consumed = int(arg)
            elif op == "D":
                self.demand.append(int(arg))
            elif op == "V":
                k = int(arg)
                self.covered[k] = 1
            self.cv.notify_all()

    def take(self):
        """The next piece to read (a demanded one first), or None to stop."""
        with self.cv:
            while True:
                if self.stop:
                    return None
                while self.next < len(self.pieces) and self.taken[self.next]:
                    self.next += 1
                while self.demand:
                    k = self.demand.popleft()
                    if self.taken[k]:
                        continue
                    if self.next <= k < self.next + self.near:
                        self.due = max(self.due, k)     # in turn, soon: keep the stream
                        continue
                    return self._mark(k)
                if self.next >= len(self.pieces):
                    return None
                if (self.taken_bytes - self.consumed < self.ahead or self.covered[self.next]
                        or self.next <= self.due):
                    return self._mark(self.next)
                self.cv.wait()

    def _mark(self, k):
        self.taken[k] = 1
        self.taken_bytes += self.pieces[k][1]
        return k

    def read_loop(self):
        buf = bytearray(max((m for _, m in self.pieces), default=1))
        mv = memoryview(buf)
        while True:
            k = self.take()
            if k is None:
                return
            if self.covered[k]:
                self.emit(f"{k} 0")
                continue
            o, m = self.pieces[k]
            try:
                got = os.preadv(self.fd, [mv[:m]], o)
                if got != m:
                    raise OSError(f"short read of {got} of {m} bytes at offset {o}")
            except OSError as e:
                self.emit(f"E {e}")
                with self.cv:
                    self.stop = True
                    self.cv.notify_all()
                return
            self.emit(f"{k} {got}")


def main():
    path, piece, ahead, threads, near = sys.argv[1], *(int(a) for a in sys.argv[2:6])
    stdin = sys.stdin.buffer
    ranges = []
    for raw in iter(stdin.readline, b""):
        line = raw.decode().strip()
        if line == "G":
            break
        if line.startswith("R "):
            _, off, n = line.split()
            ranges.append((int(off), int(n)))
    else:
        return                        # the parent went away before the start
    try:
        w = Warmer(path, piece, ahead, ranges, near)
    except OSError as e:
        os.write(1, f"E {e}\n".encode())
        return
    readers = [threading.Thread(target=w.read_loop, daemon=True) for _ in range(threads)]
    for t in readers:
        t.start()

    def control():
        for raw in iter(stdin.readline, b""):
            w.command(raw.decode().strip())
        with w.cv:                    # end of input: the parent closed us
            w.stop = True
            w.cv.notify_all()

    threading.Thread(target=control, daemon=True).start()
    for t in readers:
        t.join()
    os.close(w.fd)
    # Not a normal exit: the control thread is blocked reading stdin, and the interpreter's
    # shutdown would wait a second for that stream's lock. Everything was written with os.write.
    os._exit(0)


if __name__ == "__main__":
    main()
