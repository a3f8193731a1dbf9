"""`aircupy serve`: an OpenAI-compatible HTTP server over one Engine (Starlette + uvicorn).

protocol (request validation) -> app (routes; gate: auth, logs, metrics) -> generation.prepare
(tokenize, check) -> generation.Generation (every choice submitted to the engine, which batches all
requests' sequences; events bridged to the request's coroutine) -> streaming.JobResponse (JSON or SSE,
abort on disconnect) with the shapes of responses.
"""
