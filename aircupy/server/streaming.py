"""The ASGI response of a generation request: reads its Generation's events, answers JSON or SSE, and
aborts the generation the moment the client disconnects.

Why not Starlette's StreamingResponse: it listens for the disconnect only under ASGI spec < 2.4; here
one task always watches `receive` for http.disconnect, for both modes and while the engine still holds
the request in its waiting queue, and aborts every choice at once (their KV blocks are freed before the
engine's next step).

A stream commits to status 200 only when the first event arrives, so an error raised before the first
token (the engine's own checks) is still a proper HTTP error; later failures become an SSE event
{"error": {...}} after which the stream closes without [DONE] (OpenAI's client raises on it).

A client that leaves mid-generation is logged with the tokens actually generated: the response waits
(briefly, shielded from the cancellation) until the engine has let go of every choice, then counts them.
"""
from __future__ import annotations

import json
import logging

import anyio

from aircupy.server import responses as R
from aircupy.server import tool_calls
from aircupy.server.generation import END, Answer, Delta, Done, Failed, Generation
from aircupy.server.protocol import GenerationRequest, from_exception

log = logging.getLogger("aircupy.server")

SETTLE_S = 10.0   # longest wait for an aborted generation to leave the engine (one step of the engine)

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def send_json(send, status: int, obj: dict, headers: list | None = None) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _failed(ev: Failed):
    err = from_exception(ev.error)
    if err.status >= 500:
        log.error("generation failed", exc_info=ev.error)
    return err


class JobResponse:
    """ASGI callable answering one generation request from its Generation's events."""

    def __init__(self, gen: Generation, req: GenerationRequest, model: str):
        self.gen, self.req, self.model = gen, req, model
        self.kind = req.kind
        self.rid, self.created = R.new_id(req.kind), R.now()
        self.usage = (gen.plan.prompt_tokens, 0)
        self._finished = False
        self._ended = False     # END was read
        # Chat with tools (not "none"): calls are parsed out of each choice's text (server/tool_calls.py).
        self.tools = req.tools if req.tools is not None and req.tools.parses_calls else None

    async def __call__(self, scope, receive, send) -> None:
        state = scope.setdefault("state", {})
        async with anyio.create_task_group() as tg:
            async def watch_disconnect():
                while (await receive())["type"] != "http.disconnect":
                    pass
                # After our last send the server reports a disconnect too: only a generation still
                # running means the client left early.
                if not self._finished and not self._ended:
                    state["disconnected"] = True
                    self.gen.cancel()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await (self._stream(send) if self.req.stream else self._whole(send))
                self._finished = True
            finally:
                if not self._finished and not self._ended:  # send failed or we were cancelled: the client is gone
                    self.gen.cancel()
                    await self._settle()
                state["usage"] = self.usage
                tg.cancel_scope.cancel()

    async def _settle(self) -> None:
        """After a cancel: wait until the engine has let go of every choice, then count the tokens
        they generated (including any the client never received)."""
        with anyio.move_on_after(SETTLE_S, shield=True):
            await anyio.to_thread.run_sync(self.gen.settle, SETTLE_S)
        n = self.gen.completion_tokens
        self.gen.finished(n)
        self.usage = (self.gen.plan.prompt_tokens, n)

    async def _next(self):
        ev = await self.gen.events.get()
        if ev is END:
            self._ended = True
        return ev

    async def _whole(self, send) -> None:
        answer = Answer()
        while (ev := await self._next()) is not END:
            if isinstance(ev, Failed):
                err = _failed(ev)
                await send_json(send, err.status, err.body())
                return
            answer.add(ev)
            if isinstance(ev, Done):
                self.usage = answer.usage
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
        ev = await self._next()  # waits for the first token; the disconnect watcher may cancel us here
        if isinstance(ev, Failed):
            err = _failed(ev)
            await send_json(send, err.status, err.body())
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        started: set[int] = set()
        offsets: dict[int, int] = {}   # completion text emitted per choice (legacy logprobs text_offset)
        want_lp = self.req.logprobs is not None
        parsers: dict[int, tool_calls.ToolCallStream] = {}
        while ev is not END:
            out = b""
            if isinstance(ev, Failed):
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
            ev = await self._next()
        tail = b""
        if self.req.include_usage:
            tail += R.sse(R.usage_chunk(self.kind, self.rid, self.created, self.model, *self.usage))
        await send({"type": "http.response.body", "body": tail + R.sse("[DONE]"), "more_body": False})
