"""`aircupy batch INPUT -o OUTPUT`: an OpenAI Batch API file run through the server's request handling.

Why in server/: a batch line's body is an OpenAI request, and its answer must be the one `aircupy serve`
gives; the validation (protocol, structured), tokenizing and checks (generation.prepare), generation
(generation.run) and the answer's shape (generation.Answer, responses) all live here, so the batch file
is one more transport over them, beside HTTP. Nothing here imports Starlette.

    items = batch_file.plan(batch_file.read_input(data), batch_file.scan_output(out_path))
    with batch_file.Output(out_path, overwrite=False) as out:
        summary = run_batch(engine, items, out, model_name="m", max_concurrency=64)

run_batch keeps up to max_concurrency requests in flight on worker threads that call the engine (the
Engine batches concurrent callers: their sequences decode together) and writes each record as it
finishes, on the calling thread alone. Setting `stop` (the first Ctrl-C)
takes no new request and cancels the ones in flight after their current token; a request that did not
finish is not written, so the next run (resuming) runs it again.
"""
from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from aircupy.server import batch_file, generation, protocol
from aircupy.server import responses as R
from aircupy.server.batch_file import Line, Rejected
from aircupy.server.limits import Limits
from aircupy.server.protocol import DEFAULT_LIMITS, bad

log = logging.getLogger("aircupy.batch")

DEFAULT_MAX_CONCURRENCY = 64   # when the engine states no max_num_seqs of its own
TICK_S = 0.1                   # how often the collecting thread wakes to redraw and look at `stop`


@dataclass
class Summary:
    ok: int = 0                 # answered 200
    failed: int = 0             # answered with an error status (the server's error body)
    rejected: int = 0           # lines that are no request (error records)
    skipped: int = 0            # already in the output (resumed)
    pending: int = 0            # not finished when the run was stopped
    prompt_tokens: int = 0      # of the answers written
    completion_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False


class _Collect:
    """The job generation.run reports to, without a worker queue or an event loop: events go straight
    into an Answer; `cancelled` is the run's stop event."""

    def __init__(self, cancelled: threading.Event):
        self.cancelled = cancelled
        self.answer = generation.Answer()

    def emit(self, ev) -> None:
        self.answer.add(ev)


class _Meter:
    """generation.run's metrics hooks: live generated-token count for the progress line."""

    def __init__(self):
        self._lock = threading.Lock()
        self.tokens = 0

    def on_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n

    def on_finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        pass


def answer(engine, line: Line, model_name: str, limits: Limits = DEFAULT_LIMITS, special_in_messages: bool = False,
           cancelled: threading.Event | None = None, metrics=None) -> tuple[int, dict, tuple[int, int]] | None:
    """What `aircupy serve` answers to this line's body, without HTTP: (status, body, (prompt_tokens,
    completion_tokens)). None when `cancelled` was set before the answer was complete."""
    cancelled = cancelled if cancelled is not None else threading.Event()
    try:
        body = protocol.check_body(line.body)
        req = (protocol.parse_chat if line.kind == "chat" else protocol.parse_completion)(body, limits)
        protocol.check_model(req.model, model_name)
        if req.stream:   # nothing streams into a file: refused rather than silently answered whole
            raise bad("stream", "is not supported in a batch file (each answer is written whole)")
        plan = generation.prepare(engine, req, limits, special_in_messages, cancel=cancelled)
        if plan is None:
            return None
        job = _Collect(cancelled)
        generation.run(engine, plan, req.n, job, metrics=metrics)
        if not job.answer.finished(len(plan.prompt_ids) * req.n):
            return None
        return 200, job.answer.body(req, R.new_id(req.kind), R.now(), model_name), job.answer.usage
    except Exception as e:   # every failure is this line's answer, as the server's handlers do
        err = protocol.from_exception(e)
        if err.status >= 500:
            log.error("batch line %d (custom_id %r) failed", line.number, line.custom_id, exc_info=e)
        return err.status, err.body(), (0, 0)


def concurrency(engine, max_concurrency: int | None) -> int:
    """--max-concurrency, else the engine's max_num_seqs (the batch it can run at once), else 64."""
    return max_concurrency or getattr(engine, "max_num_seqs", None) or DEFAULT_MAX_CONCURRENCY


_EXIT = object()   # a worker's last message


def run_batch(engine, items: list, out: batch_file.Output, *, model_name: str, max_concurrency: int,
              limits: Limits = DEFAULT_LIMITS, special_in_messages: bool = False,
              stop: threading.Event | None = None, progress=None) -> Summary:
    """Run `items` (batch_file.plan's list) and write one record each to `out`; see the module docstring.
    progress: a console.BatchProgress (show, notice, close) or None."""
    stop = stop if stop is not None else threading.Event()
    s = Summary()
    t0 = time.perf_counter()
    # Records of lines that are no request first, in input order (resuming relies on it, batch_file).
    for item in items:
        if isinstance(item, Rejected):
            out.write(item.record())
            s.rejected += 1
    lines = [item for item in items if isinstance(item, Line)]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for line in lines:
        todo.put(line)
    results: queue.SimpleQueue = queue.SimpleQueue()
    meter = _Meter()

    def work() -> None:
        try:
            while not stop.is_set():
                try:
                    line = todo.get_nowait()
                except queue.Empty:
                    return
                results.put((line, answer(engine, line, model_name, limits, special_in_messages, stop, meter)))
        finally:
            results.put(_EXIT)

    alive = min(max_concurrency, len(lines))
    for i in range(alive):
        threading.Thread(target=work, name=f"aircupy-batch-{i}", daemon=True).start()
    said_stop = False
    try:
        while alive:
            try:
                msg = results.get(timeout=TICK_S)
            except queue.Empty:
                msg = None
            if msg is _EXIT:
                alive -= 1
            elif msg is not None:
                _record(out, s, *msg)
            if stop.is_set() and not said_stop and progress is not None:
                progress.notice("stopping: finishing the tokens in flight (Ctrl-C again to quit at once)")
            said_stop = said_stop or stop.is_set()
            if progress is not None:
                progress.show(s.ok + s.failed, s.failed, meter.tokens)
    except BaseException:    # a failed write, or the second Ctrl-C: the workers stop after their token
        stop.set()
        if progress is not None:
            progress.close()
        raise
    s.pending += todo.qsize()
    s.interrupted = stop.is_set() and s.pending > 0
    s.seconds = time.perf_counter() - t0
    if progress is not None:
        progress.show(s.ok + s.failed, s.failed, meter.tokens, force=True)
        progress.close()
    return s


def _record(out: batch_file.Output, s: Summary, line: Line, result) -> None:
    if result is None:     # stopped before it finished: not written, run again on resume
        s.pending += 1
        return
    status, body, (prompt, completion) = result
    out.write(batch_file.request_record(line.custom_id, status, body))
    if status == 200:
        s.ok += 1
        s.prompt_tokens += prompt
        s.completion_tokens += completion
    else:
        s.failed += 1


@contextmanager
def first_interrupt_sets(stop: threading.Event):
    """The first Ctrl-C (SIGINT) sets `stop`, for a clean stop with every finished line written; the
    second raises KeyboardInterrupt as usual. Only the main thread may install a signal handler: on
    another, Ctrl-C keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def read_input(path: str, stdin=None) -> bytes:
    """INPUT's bytes; `-` reads standard input (which must not be a terminal)."""
    from aircupy.errors import AircupyError
    if path != "-":
        with open(path, "rb") as f:
            return f.read()
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None or (hasattr(stdin, "isatty") and stdin.isatty()):
        raise AircupyError("no input: give INPUT as a file or pipe the JSONL lines into `-`")
    return getattr(stdin, "buffer", stdin).read()


def batch_command(input_path: str, output_path: str, *, model, backend: str, vram_budget, n_ctx,
                  model_name: str | None, max_concurrency: int | None, overwrite: bool, stdin=None, err=None,
                  stop: threading.Event | None = None) -> Summary:
    """`aircupy batch`: read INPUT (and what OUTPUT already holds, unless overwrite) before the model
    loads, so a bad file fails fast; run the rest; print the summary. The first Ctrl-C stops cleanly
    (Summary.interrupted), the second at once."""
    import errno
    import os

    from aircupy import console
    from aircupy.errors import AircupyError
    err = err if err is not None else sys.stderr
    items = batch_file.read_input(read_input(input_path, stdin))
    if input_path != "-" and os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise AircupyError(f"OUTPUT is INPUT ({output_path}): give the results a file of their own")
    where = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(where):   # said before the model loads, not after
        raise FileNotFoundError(errno.ENOENT, "no such directory", where)
    done = batch_file.Done() if overwrite else batch_file.scan_output(output_path)
    if done.torn_bytes:
        err.write(f"{output_path}: dropped a torn last line ({done.torn_bytes} bytes) left by an earlier run\n")
    todo = batch_file.plan(items, done)
    skipped = len(items) - len(todo)
    if skipped:
        err.write(f"resuming {output_path}: {skipped} of {len(items)} lines already done\n")
    if not todo:
        s = Summary(skipped=skipped)
    else:
        engine = console.load_engine(model, backend, vram_budget, n_ctx, err=err)
        limit = concurrency(engine, max_concurrency)
        progress = console.BatchProgress(sum(isinstance(i, Line) for i in todo), stream=err)
        stop = stop if stop is not None else threading.Event()
        with batch_file.Output(output_path, overwrite) as out, first_interrupt_sets(stop):
            s = run_batch(engine, todo, out, model_name=model_name or engine.model_name, max_concurrency=limit,
                          stop=stop, progress=progress)
        s.skipped = skipped
    err.write(console.batch_summary(s) + "\n")
    return s
