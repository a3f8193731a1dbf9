"""Receiving a request: its body within size and time limits, and work off the event loop that is
abandoned the moment the client leaves.

A client that leaves before any answer was sent is nginx's 499 ("client closed request"): the handler
marks scope["state"]["disconnected"] and sends nothing, and the gate logs one line with that status.
That covers a client leaving mid-upload (Starlette raises ClientDisconnect from the body stream; left
to the default handler it was a 500 with a traceback per client) and one leaving while its prompt is
rendered and tokenized (its place in line is given up at once, not after the tokenizer finishes).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import anyio
from starlette.requests import ClientDisconnect, Request

from aircupy.server import protocol
from aircupy.server.limits import Limits
from aircupy.server.protocol import APIError


class ClientGone(Exception):
    """The client disconnected before it was answered; nothing is sent, the request logs as 499."""


def mark_gone(scope) -> None:
    scope.setdefault("state", {})["disconnected"] = True


async def answer_nothing(scope, receive, send) -> None:
    """The ASGI response for a client that is gone: there is nobody to send to."""


async def client_gone(request: Request, exc: Exception):
    """Exception handler for ClientDisconnect and ClientGone: a 499 in the log and metrics, no traceback."""
    mark_gone(request.scope)
    return answer_nothing


async def read_json(request: Request, max_body: int, limits: Limits) -> dict:
    """The body as a JSON object; 413 when the declared or the actually streamed size exceeds max_body
    (chunked uploads have no Content-Length, so the bytes are counted as they arrive); 408 when the
    body takes longer than limits.body_timeout in all, or pauses for longer than limits.idle_timeout.
    A client that leaves mid-upload raises ClientDisconnect (a 499, see client_gone)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_body} bytes",
                       code="request_too_large")
    buf = bytearray()
    deadline = anyio.current_time() + limits.body_timeout
    pieces = request.stream().__aiter__()
    while True:
        with anyio.move_on_after(min(limits.idle_timeout, deadline - anyio.current_time())) as waited:
            piece = await anext(pieces, None)
        if waited.cancelled_caught:
            raise APIError(408, f"the request body did not arrive in time (all of it within "
                                f"{limits.body_timeout:g} s, with no pause over {limits.idle_timeout:g} s)",
                           code="request_timeout")
        if piece is None:
            break
        buf += piece
        if len(buf) > max_body:
            raise APIError(413, f"request body exceeds the limit of {max_body} bytes", code="request_too_large")
    return protocol.parse_json(bytes(buf))


async def while_connected(request: Request, fn: Callable[[threading.Event], Any]) -> Any:
    """fn(cancel) on a worker thread while one task waits for the client's disconnect (the body has
    been read, so the next ASGI message is http.disconnect). If the client leaves first, `cancel` is
    set (fn checks it between pieces of work), the thread is abandoned and ClientGone is raised."""
    cancel = threading.Event()
    result: Any = None
    error: BaseException | None = None
    gone = False
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            cancel.set()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await anyio.to_thread.run_sync(fn, cancel, abandon_on_cancel=True)
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
            error = e
        tg.cancel_scope.cancel()
    if gone:
        raise ClientGone()
    if error is not None:
        raise error
    return result


__all__ = ["ClientDisconnect", "ClientGone", "answer_nothing", "client_gone", "mark_gone", "read_json",
           "while_connected"]
