"""What one client may ask of a shared server: per-request caps and the timeouts for slow clients.

Every cap is a 400 naming the parameter when exceeded (OpenAI's error shape), never a silent clamp: a
client that asked for 10 choices and got 4 would not know. Defaults are generous for real use and
bound what one request can queue: each choice of each prompt is a sequence in the engine (up to
max_prompts x max_n of them), a stop string is matched after every token, and a logit_bias entry is
applied to every sampled token. Requests run concurrently, batched by the engine; `max_waiting` bounds
the sequences waiting for a place in its batch: a request arriving beyond it is a 503 (retry later),
so a flood of clients cannot queue without bound.

Timeouts: `body_timeout` bounds the time from the request's head to the last byte of its body, and
`idle_timeout` both the silence allowed while the body arrives and the time a connection may take to
send a complete request head (runner.py enforces that one below HTTP); a client that never sends its
body gets a 408 and gives its connection back instead of holding it forever.
"""
from __future__ import annotations

from dataclasses import dataclass

from aircupy.errors import InvalidParameterError


@dataclass(frozen=True)
class Limits:
    """max_tokens None means the context (n_ctx): no request can ask for more than fits."""
    max_tokens: int | None = None
    max_prompts: int = 32          # prompts in one /v1/completions request
    max_n: int = 16                # choices per prompt
    max_stop: int = 16             # stop strings
    max_stop_chars: int = 1024     # length of one stop string (it is held back while it may match)
    max_logit_bias: int = 1024     # logit_bias entries
    max_waiting: int = 1024        # sequences waiting in the engine beyond which requests get a 503
    body_timeout: float = 60.0     # seconds for the whole body
    idle_timeout: float = 15.0     # seconds of silence before the request is complete

    def __post_init__(self):
        for name in ("max_prompts", "max_n", "max_stop", "max_stop_chars", "max_logit_bias", "max_waiting"):
            _positive_int(name, getattr(self, name))
        if self.max_tokens is not None:
            _positive_int("max_tokens", self.max_tokens)
        for name in ("body_timeout", "idle_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise InvalidParameterError(name, f"must be a positive number of seconds, got {v!r}")

    def max_tokens_for(self, n_ctx: int) -> int:
        return n_ctx if self.max_tokens is None else self.max_tokens


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidParameterError(name, f"must be a positive integer, got {v!r}")
