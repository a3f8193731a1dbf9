"""The ASGI response of a generation request: waits for its job, answers JSON or SSE, and cancels the
job the moment the client disconnects.

Why not Starlette's StreamingResponse: it listens for the disconnect only under ASGI spec < 2.4 and not
at all while a non-streamed request waits in line; here one task always watches `receive` for
http.disconnect, for both modes and during the wait, and frees the job's place at once.

A stream commits to status 200 only when the job's first event arrives, so an error raised before the
first token (the engine's own checks) is still a proper HTTP error; later failures become an SSE event
{"error": {...}} after which the stream closes without [DONE] (OpenAI's client raises on it).

A client that leaves mid-generation is logged with the tokens actually generated: the response waits
(briefly, shielded from the cancellation) for its job to stop after the token in flight and report.
"""
from __future__ import annotations

import json
import logging

import anyio

from aircupy.server import responses as R
from aircupy.server import tool_calls
from aircupy.server.generation import Answer, Delta, Done
from aircupy.server.protocol import GenerationRequest, from_exception
from aircupy.server.worker import Job, JobFailed

log = logging.getLogger("aircupy.server")

SETTLE_S = 10.0   # longest wait for a cancelled job's own count of its tokens (one step of the engine)

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def send_json(send, status: int, obj: dict, headers: list | None = None) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _failed(ev: JobFailed):
    err = from_exception(ev.error)
    if err.status >= 500:
        log.error("generation failed", exc_info=ev.error)
    return err


class JobResponse:
    """ASGI callable answering one generation request from its Job's events."""

    def __init__(self, job: Job, worker, req: GenerationRequest, model: str):
        self.job, self.worker, self.req, self.model = job, worker, req, model
        self.kind = req.kind
        self.rid, self.created = R.new_id(req.kind), R.now()
        self.usage = (0, 0)
        self._finished = False
        self._ended = False     # Job.END was read
        # Chat with tools (not "none"): calls are parsed out of each choice's text (server/tool_calls.py).
        self.tools = req.tools if req.tools is not None and req.tools.parses_calls else None

    async def __call__(self, scope, receive, send) -> None:
        state = scope.setdefault("state", {})
        async with anyio.create_task_group() as tg:
            async def watch_disconnect():
                while (await receive())["type"] != "http.disconnect":
                    pass
                # After our last send the server reports a disconnect too: only a job still working means
                # the client left early.
                if not self._finished and self.job.finished_at is None:
                    state["disconnected"] = True
                    self.worker.cancel(self.job)
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await (self._stream(send) if self.req.stream else self._whole(send))
                self._finished = True
            finally:
                if not self._finished:  # send failed or we were cancelled: the client is gone
                    if not self.worker.cancel(self.job) and not self._ended:
                        await self._settle()
                state["usage"] = self.usage
                tg.cancel_scope.cancel()

    async def _settle(self) -> None:
        """After a cancel of a started job: read its remaining events up to Job.END, for the usage its
        Done reports (the tokens it generated, including any the client never received)."""
        with anyio.move_on_after(SETTLE_S, shield=True):
            while (ev := await self.job.next_event()) is not Job.END:
                if isinstance(ev, Done):
                    self.usage = (ev.prompt_tokens, ev.completion_tokens)

    async def _whole(self, send) -> None:
        answer = Answer()
        while (ev := await self.job.next_event()) is not Job.END:
            if isinstance(ev, JobFailed):
                err = _failed(ev)
                await send_json(send, err.status, err.body())
                return
            answer.add(ev)
            self.usage = answer.usage
        self._ended = True
        await send_json(send, 200, answer.body(self.req, self.rid, self.created, self.model))

    def _chunk(self, index: int, **kw) -> bytes:
        return R.sse(R.chunk(self.kind, self.rid, self.created, self.model, index,
                             include_usage=self.req.include_usage, **kw))

    def _tool_chunks(self, index: int, events: list, lps, n_before: int) -> bytes:
        """Chunks for one step's parsed events: content as content deltas, each call as OpenAI streams
        it (a delta with its index, id, type and name, then one with its arguments)."""
        out, text, n = b"", "", n_before
        for kind, value in events + [("end", None)]:
            if kind == "content":
                text += value
                continue
            if text or lps:
                out += self._chunk(index, text=text, logprobs=lps)
                text, lps = "", None
            if kind == "call":
                head = {"index": n, "id": value.id, "type": "function",
                        "function": {"name": value.name, "arguments": ""}}
                out += self._chunk(index, tool_calls=[head])
                out += self._chunk(index, tool_calls=[{"index": n, "function": {"arguments": value.arguments}}])
                n += 1
        return out

    async def _stream(self, send) -> None:
        ev = await self.job.next_event()  # waits in line; the disconnect watcher may cancel us here
        if isinstance(ev, JobFailed):
            err = _failed(ev)
            await send_json(send, err.status, err.body())
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        started: set[int] = set()
        offsets: dict[int, int] = {}   # completion text emitted per choice (legacy logprobs text_offset)
        want_lp = self.req.logprobs is not None
        parsers: dict[int, tool_calls.ToolCallStream] = {}
        while ev is not Job.END:
            out = b""
            if isinstance(ev, JobFailed):
                await send({"type": "http.response.body", "body": R.sse(_failed(ev).body()), "more_body": False})
                return
            if isinstance(ev, Delta):
                if ev.index not in started and self.kind == "chat":  # OpenAI's first chunk: the role
                    out += self._chunk(ev.index, role=True, text="")
                started.add(ev.index)
                lps = list(ev.logprobs or ()) if want_lp else None
                finish = ev.finish
                if self.tools is not None:
                    parser = parsers.setdefault(ev.index, tool_calls.ToolCallStream(
                        self.tools.convention, self.tools.names, self.tools.max_calls))
                    n_before = parser.n_calls
                    events = parser.feed(ev.text) + (parser.finish() if finish is not None else [])
                    out += self._tool_chunks(ev.index, events, lps, n_before)
                    if finish is not None and parser.n_calls:
                        finish = "tool_calls"
                elif ev.text or lps:
                    out += self._chunk(ev.index, text=ev.text, logprobs=lps, text_offset=offsets.get(ev.index, 0))
                    offsets[ev.index] = offsets.get(ev.index, 0) + len(ev.text)
                if finish is not None:
                    out += self._chunk(ev.index, text=None if self.kind == "chat" else "", finish=finish)
            elif isinstance(ev, Done):
                self.usage = (ev.prompt_tokens, ev.completion_tokens)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            ev = await self.job.next_event()
        self._ended = True
        tail = b""
        if self.req.include_usage:
            tail += R.sse(R.usage_chunk(self.kind, self.rid, self.created, self.model, *self.usage))
        await send({"type": "http.response.body", "body": tail + R.sse("[DONE]"), "more_body": False})
