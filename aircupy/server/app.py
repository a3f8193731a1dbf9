"""The OpenAI-compatible Starlette app: create_app(engine, model_name, api_key=None, max_body=..., limits=...).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics, POST /tokenize, POST /detokenize. Generation requests are validated and tokenized off the
event loop (generation.prepare, abandoned if the client leaves meanwhile), submitted to the engine,
which runs every request's sequences together (continuous batching), and answered by
streaming.JobResponse. Every error is OpenAI's error object; a client that left before its answer is a
499 in the log. A request arriving while the engine already holds Limits.max_waiting sequences waiting
is refused with a 503 (the client may retry), so a flood cannot queue without bound.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from functools import partial

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aircupy.errors import AircupyError, InvalidParameterError, TemplateError, UnsafeTemplateError
from aircupy.server import generation, protocol
from aircupy.server.gate import Gate
from aircupy.server.limits import Limits
from aircupy.server.metrics import CONTENT_TYPE, Metrics
from aircupy.server.protocol import APIError
from aircupy.server.receive import ClientDisconnect, ClientGone, client_gone, read_json, while_connected
from aircupy.server.responses import models_list
from aircupy.server.streaming import JobResponse

log = logging.getLogger("aircupy.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024   # a 128k-token prompt is ~0.5 MB of text or ~0.8 MB of token ids


class ServerState:
    """Everything the handlers share, hung on app.state.server (one per app, no globals)."""

    def __init__(self, engine, model_name: str, api_key: str | None, max_body: int, limits: Limits,
                 special_in_messages: bool):
        self.engine, self.model_name, self.api_key, self.max_body = engine, model_name, api_key, max_body
        self.limits, self.special_in_messages = limits, special_in_messages
        self.metrics = Metrics()
        self.generations: set = set()       # generations in flight (their count is the queue depth)
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        protocol.check_model(model, self.model_name)

    def engine_stats(self):
        return getattr(self.engine, "stats", None)

    def check_room(self) -> None:
        """503 while the engine holds max_waiting sequences waiting for a place in the batch."""
        stats = self.engine_stats()
        waiting = stats().get("waiting", 0) if stats is not None else 0
        if waiting >= self.limits.max_waiting:
            raise APIError(503, f"the server is busy: {waiting} sequences are waiting for the engine; retry later",
                           code="server_busy")

    async def body(self, request: Request) -> dict:
        return await read_json(request, self.max_body, self.limits)


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _generate(request: Request, parse) -> JobResponse:
    s = _state(request)
    req = parse(await s.body(request), s.limits)
    s.check_model(req.model)
    s.check_room()
    loop = asyncio.get_running_loop()
    box: list[generation.Generation] = []

    def prepare_and_submit(cancel):
        plan = generation.prepare(s.engine, req, s.limits, s.special_in_messages, cancel)
        if plan is None or cancel.is_set():     # the client left (this thread was abandoned)
            return None
        gen = generation.Generation(s.engine, plan, req.n, generation.AsyncEvents(loop), metrics=s.metrics)
        box.append(gen)
        if cancel.is_set():     # ... just now: whatever start() submits is aborted
            gen.cancel()
        gen.start()
        return gen

    try:
        gen = await while_connected(request, prepare_and_submit)
    except BaseException:   # an error, or ClientGone: whatever was submitted is aborted at once
        for g in box:
            g.cancel()
        raise
    s.generations.add(gen)
    return _Tracked(JobResponse(gen, req, s.model_name), s.generations, gen)


class _Tracked:
    """The response, keeping its generation in ServerState.generations while it is answered."""

    def __init__(self, response: JobResponse, registry: set, gen):
        self.response, self.registry, self.gen = response, registry, gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.registry.discard(self.gen)


async def chat_completions(request: Request):
    return await _generate(request, protocol.parse_chat)


async def completions(request: Request):
    return await _generate(request, protocol.parse_completion)


async def models(request: Request):
    s = _state(request)
    if "model" in request.path_params:
        s.check_model(request.path_params["model"])
        return JSONResponse(models_list(s.model_name, s.created)["data"][0])
    return JSONResponse(models_list(s.model_name, s.created))


async def health(request: Request):
    return JSONResponse({"status": "ok", "model": _state(request).model_name})


async def metrics(request: Request):
    s = _state(request)
    return Response(s.metrics.render(len(s.generations), s.engine_stats()), media_type=CONTENT_TYPE)


async def tokenize(request: Request):
    """llama.cpp's {"content", "add_special", "with_pieces"} or vLLM's {"prompt" | "messages",
    "add_special_tokens"} -> {"tokens", "count", "max_model_len"}; messages go through the chat template
    with the generation prompt, so the count is what a chat completion's prompt would be."""
    s = _state(request)
    body = await s.body(request)
    add_special = protocol.opt_bool(body, "add_special")
    if add_special is None:
        add_special = protocol.opt_bool(body, "add_special_tokens")
    add_special = True if add_special is None else add_special
    if body.get("messages") is not None:
        msgs = protocol.parse_chat({"messages": body["messages"]}).prompts[0]
        fn, arg = partial(s.engine.prompt_ids, special_in_messages=s.special_in_messages), msgs
    else:
        text = protocol.opt_str(body, "content")
        text = protocol.opt_str(body, "prompt") if text is None else text
        if text is None:
            raise protocol.bad("content", "is required (or prompt, or messages)", "missing_required_parameter")
        # add_special=True counts exactly what a completion of this text would (the BOS added once).
        fn = s.engine.prompt_ids if add_special and text else partial(s.engine.tokenize, add_special=False)
        arg = text
    ids = await while_connected(request, lambda cancel: fn(arg))   # a client that leaves is not waited for
    out: dict = {"tokens": ids, "count": len(ids), "max_model_len": s.engine.n_ctx}
    if protocol.opt_bool(body, "with_pieces"):
        tok = s.engine.tokenizer
        out["tokens"] = [{"id": t, "piece": tok.token_text(t)} for t in ids]
    return JSONResponse(out)


async def detokenize(request: Request):
    """{"tokens": [ids]} -> {"content": text, "prompt": text} (llama.cpp's and vLLM's names)."""
    s = _state(request)
    ids = (await s.body(request)).get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise protocol.bad("tokens", "expected a list of token ids", "invalid_type")
    protocol.check_token_ids(ids, s.engine.tokenizer.vocab_size, "tokens")
    text = await anyio.to_thread.run_sync(s.engine.detokenize, ids)
    return JSONResponse({"content": text, "prompt": text})


async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _aircupy_error(request, exc: AircupyError):
    return await _api_error(request, protocol.from_exception(exc))


async def _internal_error(request, exc: Exception):
    # A bug, not the client's doing: still OpenAI's error object (Starlette logs the traceback).
    return JSONResponse(protocol.from_exception(exc).body(), status_code=500)


async def _http_error(request, exc: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail)
    return JSONResponse(APIError(exc.status_code, msg, code=code).body(), status_code=exc.status_code,
                        headers=exc.headers)


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
]


def create_app(engine, model_name: str, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               limits: Limits | None = None, special_in_messages: bool = False) -> Starlette:
    """The ASGI app serving `engine` as `model_name` (the engine runs the requests; the app does not
    close it).

    api_key: None serves without authentication; a key must not be empty or blank (an empty key
    once turned authentication off silently). limits: per-request caps and slow-client timeouts
    (server/limits.py). special_in_messages: parse special-token text in chat messages (off: a user
    cannot forge "<|im_start|>system", as at OpenAI)."""
    if api_key is not None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise InvalidParameterError("api_key", "is empty: give a key, or serve without one explicitly "
                                                   "(--no-auth)")
        api_key = api_key.strip()   # HTTP strips the header value's blanks too
    _check_template(engine)
    state = ServerState(engine, model_name, api_key, max_body, limits or Limits(), special_in_messages)

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            for gen in list(state.generations):     # shutting down: nothing more is read
                gen.cancel()

    gate = Middleware(Gate, state=state, paths=frozenset(r.path for r in ROUTES))
    app = Starlette(routes=ROUTES, lifespan=lifespan, middleware=[gate],
                    exception_handlers={APIError: _api_error, AircupyError: _aircupy_error,
                                        HTTPException: _http_error, ClientDisconnect: client_gone,
                                        ClientGone: client_gone, Exception: _internal_error})
    app.state.server = state
    return app


def _check_template(engine) -> None:
    """Render a one-message chat at start-up: a template the sandbox refuses (hostile, or beyond its
    budget) refuses the server; one that merely rejects this chat is reported once, loudly."""
    try:
        engine.apply_chat_template([{"role": "user", "content": "hi"}])
    except UnsafeTemplateError:
        raise
    except TemplateError as e:
        log.warning("the model's chat template cannot be used (%s): /v1/chat/completions will answer 400", e)
