"""tests/helpers/asgi_client.py (the GPU tier's way into the server, which has no uvicorn or httpx
there) on the CPU: the numpy backend on a tiny synthetic model, answers equal to the Engine's."""
from __future__ import annotations

import json

import pytest

from aircupy.engine.params import SamplingParams
from aircupy.server.app import create_app
from aircupy.synth import synth_model
from tests.helpers.asgi_client import asgi_request

TINY = {"vocab": 400, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "head_dim": 64, "n_ff": 512}
HELLO = [{"role": "user", "content": "Hello world, why is the sky blue?"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from aircupy import Engine
    rep = synth_model(tmp_path_factory.mktemp("asgi") / "m.gguf", "llama3-8b", "Q8_0", n_layers=2,
                      overrides=TINY, seed=4, logit_std=8.0)
    e = Engine(rep.path, backend="numpy", n_ctx=128)
    a = create_app(e, "tiny")
    yield a, e
    e.close()


def test_chat_completion_through_the_asgi_interface_equals_the_engine(app):
    a, e = app
    status, body = asgi_request(a, "POST", "/v1/chat/completions",
                                {"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    r = json.loads(body)
    want = e.generate(HELLO, SamplingParams(max_tokens=6, temperature=0))
    assert r["choices"][0]["message"]["content"] == want.text
    assert r["usage"]["completion_tokens"] == len(want.token_ids)


def test_streamed_answer_and_errors_come_back_whole(app):
    a, e = app
    status, body = asgi_request(a, "POST", "/v1/chat/completions",
                                {"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0,
                                 "stream": True})
    assert status == 200
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(ev)["choices"][0]["delta"].get("content") or "" for ev in events[:-1])
    assert text == e.generate(HELLO, SamplingParams(max_tokens=6, temperature=0)).text
    status, body = asgi_request(a, "POST", "/v1/chat/completions", {"model": "other", "messages": HELLO})
    assert status in (400, 404) and "error" in json.loads(body)
    assert asgi_request(a, "GET", "/health")[0] == 200
