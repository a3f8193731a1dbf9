"""The server's queue, cancellation and failure paths, against a model-free fake engine (fast, exact timing
control). The same server code runs the real model in test_server.py."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from aircupy.server.app import create_app
from aircupy.server.runner import ServerThread
from tests.helpers.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def served():
    """One server over a fake engine that takes 10 ms per token."""
    engine = FakeEngine(n_ctx=4096, delay=0.01)   # max_tokens up to the context: 2000-token streams
    app = create_app(engine, "fake")
    with ServerThread(app) as url:
        yield url, engine, app.state.server


def wait_for(cond, timeout=30.0):
    """Poll until cond() holds; the timeout only turns a hang into a failure (not a speed bound)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def body(prompt, max_tokens, stream=True, **kw):
    return {"model": "fake", "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **kw}


def test_concurrent_streams_complete_in_arrival_order(served):
    url, engine, state = served
    engine.log.clear()
    finished: list[str] = []

    async def one(client, tag):
        async with client.stream("POST", "/v1/completions", json=body(tag, 8)) as r:
            assert r.status_code == 200
            text = "".join([line async for line in r.aiter_lines()])
        assert text.rstrip().endswith("data: [DONE]")
        finished.append(tag)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            tasks = []
            for i, tag in enumerate(["p0", "p1", "p2", "p3"]):
                tasks.append(asyncio.create_task(one(client, tag)))
                while state.worker.depth + len(finished) < i + 1:   # sent once this one holds its place
                    await asyncio.sleep(0.002)
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert finished == ["p0", "p1", "p2", "p3"]
    assert [t for e, t in engine.log if e == "start"] == finished
    assert [e for e, _ in engine.log] == ["start", "end"] * 4      # never two sequences at once
    wait_for(lambda: state.worker.depth == 0)


def generated_tokens(url: str) -> int:
    """The server's count of generated tokens (/metrics), which moves with every token streamed."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("aircupy_generation_tokens_total "):
            return int(float(line.split()[-1]))
    raise AssertionError("aircupy_generation_tokens_total not in /metrics")


def test_disconnect_mid_stream_frees_the_engine_at_once(served):
    url, engine, state = served
    engine.log.clear()
    before = generated_tokens(url)
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body("long", 2000)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the response is closed: the generation must stop, and the next request run after it
        r2 = client.post("/v1/completions", json=body("next", 3, stream=False))
    assert r2.status_code == 200 and r2.json()["choices"][0]["text"] == "abc"
    # work counted, not time: the long request stopped far short of its 2000 tokens (at 10 ms a
    # token, 500 is 5 s of a client gone)
    assert generated_tokens(url) - before < 500 + 3
    assert engine.log[:2] == [("start", "long"), ("closed", "long")] and engine.log[2] == ("start", "next")


def test_disconnect_while_queued_frees_the_place(served):
    url, engine, state = served
    engine.log.clear()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def consume(tag, n):
                async with client.stream("POST", "/v1/completions", json=body(tag, n)) as r:
                    return [x async for x in r.aiter_lines()]
            running = asyncio.create_task(consume("running", 60))     # ~0.6 s
            await asyncio.to_thread(wait_for, lambda: state.worker.depth == 1)
            queued = asyncio.create_task(consume("queued", 5))
            await asyncio.to_thread(wait_for, lambda: state.worker.depth == 2)
            queued.cancel()                                            # the client gives up while waiting
            await asyncio.to_thread(wait_for, lambda: state.worker.depth == 1, 1.0)
            assert not running.done()
            await running

    asyncio.run(main())
    assert ("start", "queued") not in engine.log and ("end", "running") in engine.log


def test_non_streamed_request_is_cancelled_when_the_client_times_out(served):
    url, engine, state = served
    engine.log.clear()
    with httpx.Client(base_url=url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body("slow", 2000, stream=False))
    wait_for(lambda: ("closed", "slow") in engine.log, 2.0)
    wait_for(lambda: state.worker.depth == 0, 2.0)
    wait_for(lambda: 'status="499"' in httpx.get(url + "/metrics").text, 2.0)   # logged as "client left"


def test_openai_async_client_streams_in_order(served):
    url, engine, state = served

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        streams = []
        for _ in range(3):
            streams.append(asyncio.create_task(client.completions.create(model="fake", prompt="x", max_tokens=4,
                                                                           stream=True)))
        out = []
        for task in streams:
            s = await task
            out.append("".join([c.choices[0].text async for c in s if c.choices]))
        await client.close()
        return out

    assert asyncio.run(main()) == ["abcd"] * 3


def test_failure_mid_stream_sends_an_error_event_then_closes():
    engine = FakeEngine(delay=0.0, fail_after=2)
    with ServerThread(create_app(engine, "fake")) as url:
        r = httpx.post(url + "/v1/completions", json=body("x", 5))
        assert r.status_code == 200
        events = [json.loads(x[6:]) if x != "data: [DONE]" else x for x in r.text.split("\n\n") if x]
        assert "data: [DONE]" not in events
        assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
        assert events[-1]["error"]["type"] == "server_error" and "simulated" in events[-1]["error"]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="simulated"):
            for _ in client.completions.create(model="fake", prompt="x", max_tokens=5, stream=True):
                pass
        whole = httpx.post(url + "/v1/completions", json=body("x", 5, stream=False))
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "internal_error"
        engine.prompt_ids = lambda prompt: {}["a bug before generation"]
        early = httpx.post(url + "/v1/completions", json=body("x", 5))
        assert early.status_code == 500 and early.json()["error"]["type"] == "server_error"
        assert httpx.get(url + "/health").status_code == 200                # and the server lives on


def test_template_error_is_a_clear_400():
    engine = FakeEngine()
    engine.template_error = "access to attribute '__class__' is forbidden by the sandbox"
    with ServerThread(create_app(engine, "fake")) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    e = r.json()["error"]
    assert r.status_code == 400 and e["code"] == "template_error" and "__class__" in e["message"]


def test_api_key_body_limit_and_engine_stats():
    engine = FakeEngine()
    engine.stats = lambda: {"h2d_bytes": 123, "overlap": 0.75}
    with ServerThread(create_app(engine, "fake", api_key="s3cret", max_body=1024)) as url:
        assert httpx.get(url + "/health").status_code == 200                 # probes need no key
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "fake"
        client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        big = json.dumps(body("x" * 2000, 1, stream=False)).encode()
        r = httpx.post(url + "/v1/completions", content=big, headers=auth)       # Content-Length says it
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the bytes are counted as they arrive
            for i in range(0, len(big), 256):
                yield big[i:i + 256]
        r = httpx.post(url + "/v1/completions", content=chunked(), headers=auth)
        assert r.status_code == 413
        ok = httpx.post(url + "/v1/completions", json=body("x", 2, stream=False), headers=auth)
        assert ok.status_code == 200
        m = httpx.get(url + "/metrics", headers=auth).text
    assert "aircupy_engine_h2d_bytes 123" in m and "aircupy_engine_overlap 0.75" in m
    assert 'aircupy_requests_total{endpoint="/v1/completions",status="413"} 2' in m
