"""A shared server's limits, against the model-free fake engine: per-request caps (400s naming the
parameter), clients that leave while their prompt is prepared (499, nothing submitted),
dropped streams logged with the tokens actually generated, and authentication that cannot be turned
off by an empty key."""
from __future__ import annotations

import logging
import re
import threading
import time

import httpx
import pytest

from aircupy.errors import InvalidParameterError
from aircupy.server.app import create_app
from aircupy.server.limits import Limits
from aircupy.server.runner import ServerThread, auth_key
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_probe import healthy, metric_count, wait_for

USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(n_ctx=4096, delay=0.01)
    limits = Limits(max_tokens=100, max_prompts=3, max_n=2, max_stop=2, max_logit_bias=3)
    app = create_app(engine, "fake", limits=limits)
    with ServerThread(app) as url:
        yield url, engine, app.state.server


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 101}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 101}, "max_tokens"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [2], [3], [4]], "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": USER, "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["s" * 2000]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"1": 1, "2": 1, "3": 1, "4": 1}}, "logit_bias"),
])
def test_caps_are_400s_naming_the_parameter(served, path, body, param):
    url, _, _ = served
    r = httpx.post(url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value"
    ok = {**body, "max_tokens": 2}
    ok.pop("max_completion_tokens", None)
    for key, small in (("prompt", "x"), ("n", 2), ("stop", ["a", "b"]), ("logit_bias", {"1": 1})):
        if key == param:
            ok[key] = small
    assert httpx.post(url + path, json=ok).status_code == 200


def test_max_tokens_defaults_to_the_cap(served):
    url, _, _ = served
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})   # no max_tokens: the cap
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100


def test_a_client_leaving_while_its_prompt_is_prepared_gives_up_its_place(served):
    url, engine, state = served
    entered, release = threading.Event(), threading.Event()
    real = engine.prompt_ids

    def slow_prompt_ids(prompt, **kw):      # a tokenizer that takes as long as the test wants
        entered.set()
        release.wait(30)
        return real(prompt, **kw)
    engine.prompt_ids = slow_prompt_ids
    before = metric_count(url, "/v1/completions", 499)
    try:
        def client():
            try:
                httpx.post(url + "/v1/completions", json={"prompt": "slow", "max_tokens": 2}, timeout=0.5)
            except httpx.TimeoutException:
                pass
        t = threading.Thread(target=client)
        t.start()
        assert entered.wait(10)
        t.join()                            # the client gave up while its prompt was being tokenized
        assert not state.generations and engine.stats()["waiting"] == 0   # nothing was submitted
        wait_for(lambda: metric_count(url, "/v1/completions", 499) == before + 1)
        assert not release.is_set()         # ... while the tokenizer is still busy with it
    finally:
        release.set()
        engine.prompt_ids = real
    healthy(url)
    assert ("start", "slow") not in engine.log


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing():
    engine = FakeEngine(n_ctx=64)
    with ServerThread(create_app(engine, "fake")) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 100_000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "messages" and engine.tokenized == []


def test_a_dropped_stream_logs_the_tokens_actually_generated(served, caplog):
    url, _, _ = served
    before = int(float(re.search(r"^aircupy_generation_tokens_total (\S+)$", httpx.get(url + "/metrics").text,
                                 re.M).group(1)))
    with caplog.at_level(logging.INFO, logger="aircupy.server"):
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "long", "max_tokens": 100,
                                                                "stream": True}) as r:
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data:")
                    if got == 5:
                        break
        wait_for(lambda: any("(client disconnected)" in m for m in caplog.messages))
    line = next(m for m in caplog.messages if "(client disconnected)" in m)
    generated = int(re.search(r" \d+\+(\d+) tokens", line).group(1))
    total = int(float(re.search(r"^aircupy_generation_tokens_total (\S+)$", httpx.get(url + "/metrics").text,
                                re.M).group(1)))
    assert line.startswith("POST /v1/completions 200") and 5 <= generated < 100
    assert generated == total - before      # what the engine produced, not what the client received


def test_an_empty_key_never_turns_authentication_off():
    for key in ("", "   ", "\t"):
        with pytest.raises(InvalidParameterError, match="empty"):
            create_app(FakeEngine(), "fake", api_key=key)
        with pytest.raises(InvalidParameterError, match="--no-auth"):
            auth_key(key, no_auth=False)
        assert auth_key(key, no_auth=True) is None
    assert auth_key(None, no_auth=False) is None and auth_key(" k3y ", no_auth=False) == "k3y"
    with pytest.raises(InvalidParameterError, match="contradict"):
        auth_key("k3y", no_auth=True)
    with ServerThread(create_app(FakeEngine(), "fake", api_key=" k3y ")) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_limits_are_checked():
    for bad in (dict(max_n=0), dict(max_tokens=-1), dict(body_timeout=0), dict(idle_timeout=float("inf")),
                dict(max_stop=True)):
        with pytest.raises(InvalidParameterError):
            Limits(**bad)


def test_serve_says_whether_authentication_is_on(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path / "m.gguf", "smollm2-135m", "Q8_0", n_layers=1,
                      overrides=dict(vocab=300, n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_ff=128))
    env = {**os.environ, "AIRCUPY_API_KEY": ""}
    base = [sys.executable, "-m", "aircupy", "serve", "--model", str(rep.path), "--backend", "numpy", "--port", "0"]
    r = subprocess.run(base + ["--api-key", ""], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "error: api_key" in r.stderr and "--no-auth" in r.stderr
    for extra, says in ((["--no-auth"], "no authentication (--no-auth)"), (["--api-key", "k"], "API key required"),
                        ([], "no authentication (no --api-key)")):
        proc = subprocess.Popen(base + extra, stderr=subprocess.PIPE, text=True, env=env)
        try:
            lines = []
            deadline = time.monotonic() + 60
            while not any("serving" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
                lines.append(proc.stderr.readline())
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        serving = next(x for x in lines if "serving" in x)
        assert says in serving
