"""The request queue in front of the engine: one worker thread runs jobs one at a time, in arrival order.

The engine computes one sequence at a time (continuous batching comes later), and its forward pass is
blocking numpy/CUDA work, so it runs on its own thread while the event loop keeps serving HTTP.

A Job is a place in line, taken when a request arrives (Worker.reserve, on the event loop) and given its
work once the request is validated and tokenized (Worker.start). The worker waits for the job at the
head of the line even while it is still being prepared, so requests run in the order they arrived.
Cancelling a job (its client went away) takes it out of the line at once; if it is running, its work
sees `job.cancelled` after the current token and closes the engine's generator, and the next job starts.

Events cross from the worker thread to the request's coroutine through an asyncio.Queue, fed with
loop.call_soon_threadsafe. The stream ends with Job.END; an exception in the work arrives as JobFailed.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class JobFailed:
    """The work raised; `error` is the exception (an AircupyError for a client's mistake)."""
    error: BaseException


class Job:
    """One request's place in line and its channel of events back to the event loop."""

    END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.work: Callable[[Job], None] | None = None
        self.started_at: float | None = None   # perf_counter when the worker picked it up
        self.finished_at: float | None = None

    def emit(self, event: Any) -> None:
        """Called on the worker thread: hand one event to the request's coroutine."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    async def next_event(self) -> Any:
        return await self.events.get()


class Worker:
    """FIFO of Jobs served by one daemon thread; `depth` counts jobs waiting plus the one running."""

    def __init__(self, name: str = "aircupy-engine"):
        self._cond = threading.Condition()
        self._line: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._line) + (self._running is not None)

    def reserve(self) -> Job:
        """Take a place in line for a request that just arrived (call on the event loop)."""
        job = Job(asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._line.append(job)
        return job

    def start(self, job: Job, work: Callable[[Job], None]) -> None:
        """Give a reserved job its work: `work(job)` runs on the worker thread, emitting events."""
        with self._cond:
            job.work = work
            self._cond.notify_all()

    def cancel(self, job: Job) -> bool:
        """The client is gone (or the request failed before it started): free its place now. True when
        the job was still waiting (it never runs, and emits nothing); False when it is running (its work
        stops after the current token, then emits Job.END) or has finished."""
        job.cancelled.set()
        with self._cond:
            try:
                self._line.remove(job)
                waiting = True
            except ValueError:
                waiting = False
            self._cond.notify_all()
        return waiting

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread (server shutdown)."""
        with self._cond:
            self._closed = True
            for job in self._line:
                job.cancelled.set()
            self._line.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        """Block until the job at the head of the line has its work (or we are closed)."""
        with self._cond:
            while not self._closed and not (self._line and self._line[0].work is not None):
                self._cond.wait()
            if self._closed:
                return None
            job = self._line.popleft()
            self._running = job
            return job

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            job.started_at = time.perf_counter()
            try:
                if not job.cancelled.is_set():
                    job.work(job)
            except Exception as e:  # noqa: BLE001 - delivered to the request, which decides the status
                job.emit(JobFailed(e))
            finally:
                job.finished_at = time.perf_counter()
                job.emit(Job.END)
                with self._cond:
                    self._running = None
