"""The HTTP connection below the app: uvicorn's h11 protocol with two changes.

* A request that is not HTTP (a garbage request line, `Content-Length: abc`, a malformed header) never
  reaches the app: h11 rejects it and uvicorn answers a plain-text 400. Here that answer is OpenAI's
  error object, `{"error": {..., "code": "invalid_http"}}`, so clients parse every error alike.
* A connection that has not sent a complete request head within `head_timeout` seconds (a client that
  connects and sends nothing, or dribbles its headers byte by byte) is closed; uvicorn itself only
  times out idle keep-alive connections between requests. The body's own timeouts are the app's
  (receive.read_json), which can still answer with a 408.

Always h11 (a dependency of uvicorn), even where httptools is installed, so the behaviour is one.
"""
from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("aircupy.server")

BAD_REQUEST = json.dumps({"error": {"message": "invalid HTTP request: the request line or a header could "
                                               "not be parsed", "type": "invalid_request_error", "param": None,
                                    "code": "invalid_http"}}).encode()


class AircupyH11Protocol(H11Protocol):
    head_timeout: float = 15.0   # set per server by protocol_class()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request within %g s", self.head_timeout)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        # A request started (its cycle exists and is not yet answered): its body has the app's timeouts.
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()   # the next request on this keep-alive connection gets the same time

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=BAD_REQUEST), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol_class(head_timeout: float) -> type[AircupyH11Protocol]:
    """The protocol class for one server (uvicorn instantiates it per connection)."""
    return type("AircupyH11Protocol", (AircupyH11Protocol,), {"head_timeout": float(head_timeout)})
