"""The server's concurrency, cancellation and failure paths, against a model-free fake engine that
batches like the real one (fast, exact control). The same server code runs the real model in
test_server.py."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from aircupy.server.app import create_app
from aircupy.server.limits import Limits
from aircupy.server.runner import ServerThread
from tests.helpers.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def served():
    """One server over a fake engine that takes 10 ms per step."""
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


def test_requests_run_concurrently_not_one_after_another(served):
    """Short requests sent while a long one streams finish while it still runs: with one request at a
    time they would wait for its 2000 tokens (20 s); the long one is then dropped."""
    url, engine, state = served
    engine.log.clear()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/v1/completions", json=body("long", 2000)) as long:
                lines = long.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):   # the long one is running
                    pass

                async def short(tag):
                    r = await client.post("/v1/completions", json=body(tag, 4, stream=False))
                    return r.json()["choices"][0]["text"]
                texts = await asyncio.gather(*(short(f"s{i}") for i in range(3)))
                assert ("end", "long") not in engine.log        # the long one is still going
                assert engine.stats()["running"] >= 1
        return texts

    assert asyncio.run(main()) == ["abcd"] * 3
    ends = [t for e, t in engine.log if e == "end"]
    assert sorted(ends) == ["s0", "s1", "s2"]
    wait_for(lambda: ("closed", "long") in engine.log)
    wait_for(lambda: len(state.generations) == 0 and engine.stats()["running"] == 0)


def generated_tokens(url: str) -> int:
    """The server's count of generated tokens (/metrics), which moves with every token streamed."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("aircupy_generation_tokens_total "):
            return int(float(line.split()[-1]))
    raise AssertionError("aircupy_generation_tokens_total not in /metrics")


def test_disconnect_mid_stream_frees_the_engine_at_once(served):
    url, engine, _ = served
    engine.log.clear()
    before = generated_tokens(url)
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body("long", 2000)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the response is closed: the generation must stop
        wait_for(lambda: ("closed", "long") in engine.log)
        r2 = client.post("/v1/completions", json=body("next", 3, stream=False))
    assert r2.status_code == 200 and r2.json()["choices"][0]["text"] == "abc"
    # work counted, not time: the long request stopped far short of its 2000 tokens (at 10 ms a
    # token, 500 is 5 s of a client gone)
    assert generated_tokens(url) - before < 500 + 3
    assert engine.log[:2] == [("start", "long"), ("closed", "long")] and ("end", "next") in engine.log
    assert ("end", "long") not in engine.log


def test_disconnect_while_waiting_frees_the_place():
    """An engine of one sequence at a time: the second request waits in it; its client leaving takes
    it out of the waiting queue at once, and it never runs."""
    engine = FakeEngine(n_ctx=4096, delay=0.01, max_num_seqs=1)
    with ServerThread(create_app(engine, "fake")) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async def consume(tag, n):
                    async with client.stream("POST", "/v1/completions", json=body(tag, n)) as r:
                        return [x async for x in r.aiter_lines()]
                running = asyncio.create_task(consume("running", 400))     # ~4 s: time for the rest
                await asyncio.to_thread(wait_for, lambda: engine.stats()["running"] == 1)
                queued = asyncio.create_task(consume("queued", 5))
                await asyncio.to_thread(wait_for, lambda: engine.stats()["waiting"] == 1)
                queued.cancel()                                            # the client gives up while waiting
                await asyncio.to_thread(wait_for, lambda: engine.stats()["waiting"] == 0, 5.0)
                assert not running.done()
                await running

        asyncio.run(main())
    assert ("start", "queued") not in engine.log and ("end", "running") in engine.log


def test_a_full_waiting_queue_is_a_503():
    engine = FakeEngine(n_ctx=4096, delay=0.01, max_num_seqs=1)
    with ServerThread(create_app(engine, "fake", limits=Limits(max_waiting=1))) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/completions", json=body("a", 300, stream=False)))
                await asyncio.to_thread(wait_for, lambda: engine.stats()["running"] == 1)
                second = asyncio.create_task(client.post("/v1/completions", json=body("b", 2, stream=False)))
                await asyncio.to_thread(wait_for, lambda: engine.stats()["waiting"] == 1)
                third = await client.post("/v1/completions", json=body("c", 2, stream=False))
                return third, await first, await second
        third, first, second = asyncio.run(main())
    assert third.status_code == 503 and third.json()["error"]["code"] == "server_busy"
    assert first.status_code == second.status_code == 200 and ("start", "c") not in engine.log


def test_non_streamed_request_is_cancelled_when_the_client_times_out(served):
    url, engine, state = served
    engine.log.clear()
    with httpx.Client(base_url=url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body("slow", 2000, stream=False))
    wait_for(lambda: ("closed", "slow") in engine.log, 2.0)
    wait_for(lambda: len(state.generations) == 0, 2.0)
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
