"""What a hostile client sends, against a model-free fake engine: numbers too big for a float, JSON's
missing literals, uploads cut short, bodies that never come, HTTP that is not HTTP. Each answer is
OpenAI's error shape with the right status, and a normal request still completes afterwards."""
from __future__ import annotations

import json
import logging

import httpx
import pytest

from aircupy.server.app import create_app
from aircupy.server.runner import ServerThread
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_probe import healthy, metric_count, raw_exchange, wait_for

BIG = "1" + "0" * 400          # valid JSON, an integer no float can hold


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(n_ctx=64)
    app = create_app(engine, "fake")
    with ServerThread(app) as url:
        yield url, engine, app.state.server


def post_raw(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"})


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


# ---- clients that leave, or never send ----------------------------------------------------------

def test_a_client_leaving_mid_upload_is_one_499_line_without_traceback(served, caplog):
    url, _, state = served
    before = metric_count(url, "/v1/completions", 499)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            raw_exchange(url, head + b'{"prompt": "' + b"x" * 5000, read=False)   # and close mid-body
        wait_for(lambda: metric_count(url, "/v1/completions", 499) == before + 5)
        healthy(url)
    assert metric_count(url, "/v1/completions", 500) == 0
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/completions 499")]
    assert len(lines) == 5 and len(state.generations) == 0


def test_a_body_that_never_comes_is_a_408():
    from aircupy.server.limits import Limits
    app = create_app(FakeEngine(), "fake", limits=Limits(body_timeout=5.0, idle_timeout=0.3))
    with ServerThread(app) as url:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        answer = raw_exchange(url, head + b'{"prompt"')       # then silence
        status, _, rest = answer.partition(b"\r\n")
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert b" 408 " in status and body["error"]["code"] == "request_timeout"
        assert metric_count(url, "/v1/completions", 408) == 1
        healthy(url)


def test_a_connection_that_never_sends_its_request_head_is_closed():
    from aircupy.server.limits import Limits
    app = create_app(FakeEngine(), "fake", limits=Limits(idle_timeout=0.3))
    with ServerThread(app) as url:
        # recv returns b"" once the server closes; without the head timeout it would block until the
        # socket's own 20 s timeout and raise.
        assert raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""
        assert raw_exchange(url, b"") == b""
        healthy(url)


@pytest.mark.parametrize("data", [b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"])
def test_malformed_http_gets_the_openai_error_shape(served, data):
    url, _, _ = served
    answer = raw_exchange(url, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    if b"transfer-encoding: chunked" in head.lower():   # h11 frames a length-less body in chunks
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_http" and err["type"] == "invalid_request_error" and set(err) == \
        {"message", "type", "param", "code"}
    healthy(url)
