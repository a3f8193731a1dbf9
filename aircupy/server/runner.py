"""Running the app under uvicorn: in the foreground (`aircupy serve`) or on a background thread.

ServerThread is for tests and notebooks: it binds the socket itself (port 0 picks a free one), so the
address is known before the first request and there is no race for the port. Both serve HTTP through
connection.AircupyH11Protocol (OpenAI-shaped 400s for malformed HTTP, a time limit on request heads).
"""
from __future__ import annotations

import logging
import sys
import socket
import threading
import time

import uvicorn

from aircupy.server.connection import protocol_class
from aircupy.server.limits import Limits

log = logging.getLogger("aircupy.server")


def _config(app, log_level: str) -> uvicorn.Config:
    # access_log off: the app logs its own line per request, with status, tokens and time.
    # log_config None: uvicorn's lines go through the same logging setup as ours (one format).
    # timeout_graceful_shutdown: a stream in flight must not hold a Ctrl-C hostage for long.
    server = getattr(getattr(app, "state", None), "server", None)
    limits = getattr(server, "limits", None) or Limits()
    return uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="on",
                          timeout_graceful_shutdown=5, http=protocol_class(limits.idle_timeout))


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (blocks)."""
    config = _config(app, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()


class ServerThread:
    """`with ServerThread(app) as base_url:` serves `app` on 127.0.0.1 until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="aircupy-uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.base_url

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def auth_key(api_key: str | None, no_auth: bool) -> str | None:
    """The key to require, or None with --no-auth or without a key. An empty or blank key is an
    error rather than "no authentication" (a `--api-key "$KEY"` with KEY unset turned it off)."""
    from aircupy.errors import InvalidParameterError
    blank = api_key is not None and not api_key.strip()
    if no_auth:
        if api_key is not None and not blank:
            raise InvalidParameterError("api_key", "--api-key and --no-auth contradict each other")
        return None
    if blank:
        raise InvalidParameterError("api_key", "--api-key (or AIRCUPY_API_KEY) is empty: give a key, or "
                                               "--no-auth to serve without one")
    return api_key.strip() if api_key is not None else None


SWITCH_INTERVAL_S = 0.0005


def serve(model, model_name: str | None, host: str, port: int, backend: str, vram_budget, n_ctx,
          api_key: str | None, max_body, log_level: str = "info", no_auth: bool = False,
          limits: Limits | None = None, special_in_messages: bool = False, batching: dict | None = None) -> None:
    """`aircupy serve`: load the model once, then serve it until interrupted. batching: the Engine's
    max_num_seqs, max_batched_tokens, kv_cache_tokens."""
    from aircupy.console import load_engine
    from aircupy.engine.params import parse_size
    from aircupy.server.app import create_app

    max_body = parse_size(max_body, "max_body")      # checked before the (slow) load
    key = auth_key(api_key, no_auth)
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    engine = load_engine(model, backend, vram_budget, n_ctx, **(batching or {}))
    # Two busy threads share the GIL here: the engine's runner (which waits on the GPU with the GIL
    # released, then needs it back at once to start the next step) and the event loop (formatting and
    # sending every stream's chunks). Python hands a wanted GIL over only every switch interval (5 ms
    # by default), which the runner then waits out on every step; a short interval keeps steps back to
    # back under many streaming clients.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    name = model_name or engine.model_name
    app = create_app(engine, name, api_key=key, max_body=max_body, limits=limits,
                     special_in_messages=special_in_messages)
    where = "" if host in ("127.0.0.1", "localhost", "::1") else " (reachable from the network)"
    auth = "API key required" if key else "no authentication (--no-auth)" if no_auth else \
        "no authentication (no --api-key)"
    plan = engine.kv_plan
    log.info("serving %s (%s backend, n_ctx %d) at http://%s:%d/v1%s; %s", name, engine.backend_name,
             engine.n_ctx, host, port, where, auth)
    log.info("batching up to %d sequences, %d tokens per step; KV cache %d tokens (%d blocks of %d)",
             plan.max_num_seqs, plan.max_batched_tokens, plan.tokens, plan.num_blocks, plan.block_size)
    run_server(app, host, port, log_level)
