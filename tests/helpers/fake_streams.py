"""A CPU simulator of CUDA streams and events, for testing the streamer's ordering without a GPU.

    cuda = FakeCuda(seed=0)          # stands in for cupy.cuda: Stream, Event, get_elapsed_time
    s = cuda.Stream(); s.enqueue(fn); ev = cuda.Event(); ev.record(s); other.wait_event(ev)

Work enqueued on a stream is NOT run at enqueue time: it runs when someone synchronizes (a stream, an
event) or polls `done`, in a random interleaving of the streams that respects only what CUDA
guarantees: order within a stream, and a wait_event blocks its stream until the record it captured
(the event's latest record at the time of the wait, as cudaStreamWaitEvent does) has run. A missing
wait therefore shows up as a wrong interleaving for some seed.
"""
from __future__ import annotations

import random
from collections import deque


class FakeCuda:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.streams: list[FakeStream] = []
        cuda = self

        class Stream(FakeStream):
            def __init__(self, non_blocking: bool = True):
                super().__init__(cuda)

        class Event(FakeEvent):
            def __init__(self):
                super().__init__(cuda)

        self.Stream, self.Event = Stream, Event

    @staticmethod
    def get_elapsed_time(a, b) -> float:
        assert a.done and b.done
        return 1.0  # milliseconds: every timed interval counts as 1 ms

    def _runnable(self):
        return [s for s in self.streams if s.q and s.head_ready()]

    def step(self) -> None:
        ready = self._runnable()
        if not ready:
            raise RuntimeError("deadlock: every stream with work waits on an unrecorded event")
        self.rng.choice(ready).run_head()

    def run_until(self, pred) -> None:
        while not pred():
            self.step()
        # also run a random amount of further work: later waits must not rely on lucky timing
        for _ in range(self.rng.randrange(3)):
            if self._runnable():
                self.step()


class _Record:
    def __init__(self):
        self.ran = False


class FakeEvent:
    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda
        self.rec: _Record | None = None

    def record(self, stream) -> None:
        self.rec = _Record()
        stream.q.append(("record", self.rec))

    @property
    def done(self) -> bool:
        return self.rec is None or self.rec.ran

    def synchronize(self) -> None:
        self.cuda.run_until(lambda: self.done)


class FakeStream:
    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda
        self.q: deque = deque()
        cuda.streams.append(self)

    def enqueue(self, fn) -> None:
        self.q.append(("fn", fn))

    def wait_event(self, ev: FakeEvent) -> None:
        if ev.rec is not None:
            self.q.append(("wait", ev.rec))

    def head_ready(self) -> bool:
        kind, obj = self.q[0]
        return kind != "wait" or obj.ran

    def run_head(self) -> None:
        kind, obj = self.q.popleft()
        if kind == "fn":
            obj()
        elif kind == "record":
            obj.ran = True

    def synchronize(self) -> None:
        self.cuda.run_until(lambda: not self.q)
