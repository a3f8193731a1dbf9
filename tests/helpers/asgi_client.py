"""A minimal in-process ASGI client: one HTTP request to an app, with no server, socket or httpx.

    status, body = asgi_request(app, "POST", "/v1/chat/completions", {"model": "m", ...})

The GPU host has starlette but neither uvicorn nor httpx (bench/device_session.sh carries only the
wheels the engine needs), so the GPU tier drives the server through the ASGI interface itself. The
request body arrives in one message; after it, `receive` waits until the response is complete and
only then reports a disconnect, as a client that stays for its answer would (the server watches for
a client leaving mid-generation). Streaming responses are read to their end and returned whole.
"""
from __future__ import annotations

import asyncio
import json


async def _request(app, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    done = asyncio.Event()
    sent_body = False
    status, chunks = None, []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return status, b"".join(chunks)


def asgi_request(app, method: str, path: str, payload: dict | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body bytes) of one request; `payload` is sent as a JSON body."""
    body = b"" if payload is None else json.dumps(payload).encode()
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if payload is not None:
        hdrs.append((b"content-type", b"application/json"))
    return asyncio.run(_request(app, method, path, body, hdrs))
