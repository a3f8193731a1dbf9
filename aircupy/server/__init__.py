"""`aircupy serve`: an OpenAI-compatible HTTP server over one Engine (Starlette + uvicorn).

protocol (request validation) -> app (routes; gate: auth, logs, metrics) -> generation.prepare
(tokenize, check) -> worker (one request at a time, arrival order) -> generation.run (engine.stream)
-> streaming.JobResponse (JSON or SSE, cancel on disconnect) with the shapes of responses.
"""
