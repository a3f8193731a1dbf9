"""ASGI middleware in front of every route: the API key, one log line per request, request metrics.

It sits outside the exception handlers, so it sees the status of every answer (404s and 413s included),
and it wraps the whole response, so a stream is logged when it ends, with its token counts (the
generation response leaves them in scope["state"]["usage"]).
"""
from __future__ import annotations

import hmac
import logging
import time

from aircupy.server.protocol import APIError
from aircupy.server.streaming import send_json

log = logging.getLogger("aircupy.server")

OPEN_PATHS = frozenset({"/health"})  # liveness probes carry no key; everything else needs it when set


class Gate:
    def __init__(self, app, state, paths: frozenset[str] = frozenset()):
        self.app = app
        self.state = state                         # app.ServerState: api_key, metrics
        self.known = paths                         # route paths, for bounded metric labels

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                # compare_digest: the time taken does not reveal how much of the key matched
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.state.api_key.encode())
        return False

    def _endpoint(self, path: str) -> str:
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return path if path in self.known else "other"  # arbitrary paths must not mint new series

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, started = 500, False   # 500: what an exception escaping the app becomes
        state = scope.setdefault("state", {})

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.state.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                err = APIError(401, "missing or incorrect API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key")
                await send_json(send_status, 401, err.body(), [(b"www-authenticate", b"Bearer")])
            else:
                await self.app(scope, receive, send_status)
        finally:
            if state.get("disconnected") and not started:
                status = 499   # nginx's "client closed request": it left while waiting, nothing was sent
            dt = time.perf_counter() - t0
            self.state.metrics.on_request(self._endpoint(scope["path"]), status, dt)
            usage = state.get("usage")  # (prompt, completion) tokens, set by generation responses only
            tokens = f" {usage[0]}+{usage[1]} tokens" if usage else ""
            note = " (client disconnected)" if state.get("disconnected") else ""
            log.info("%s %s %d%s %.3fs%s", scope["method"], scope["path"], status, tokens, dt, note)
