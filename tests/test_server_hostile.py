"""What a hostile client sends, against a model-free fake engine: numbers too big for a float, JSON's
missing literals, uploads cut short, bodies that never come, HTTP that is not HTTP. Each answer is
OpenAI's error shape with the right status, and a normal request still completes afterwards."""
from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

from aircupy.server.app import create_app
from aircupy.server.runner import ServerThread
from tests.helpers.fake_engine import FakeEngine

BIG = "1" + "0" * 400          # valid JSON, an integer no float can hold


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(n_ctx=64)
    app = create_app(engine, "fake")
    with ServerThread(app) as url:
        yield url, engine, app.state.server


def healthy(url: str) -> None:
    """The server still answers a normal request after the abuse."""
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"


def post_raw(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"})


def metric_count(url: str, endpoint: str, status: int) -> int:
    want = f'aircupy_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(want):
            return int(line.split()[-1])
    return 0


@pytest.mark.parametrize("param", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty", "repeat_penalty"])
def test_a_number_too_big_for_a_float_is_a_400_naming_it(served, param):
    url, _, _ = served
    body = f'{{"messages": [{{"role": "user", "content": "x"}}], "{param}": {BIG}}}'.encode()
    r = post_raw(url, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "finite" in err["message"] and err["code"] == "invalid_value"
    r = post_raw(url, "/v1/completions", f'{{"prompt": "x", "{param}": 1e400}}'.encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    healthy(url)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ['{"prompt": "x", "temperature": %s}', '{"prompt": "x", "user": [%s]}',
                                   '{"prompt": "x", "logit_bias": {"5": %s}}', '{"tokens": [1, %s]}'])
def test_nan_and_infinity_literals_are_invalid_json_anywhere(served, literal, where):
    url, _, _ = served
    path = "/detokenize" if "tokens" in where else "/v1/completions"
    r = post_raw(url, path, (where % literal).encode())
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and literal.lstrip("-") in err["message"]
