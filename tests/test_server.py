"""End to end: the real server (uvicorn on a free loopback port, numpy backend, SmolLM2) driven by the
official `openai` client and by raw HTTP. One server for the module; greedy decoding, few tokens."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from aircupy.server.app import create_app
from aircupy.server.runner import ServerThread

MODEL = "smollm2"
N_CTX = 256
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from aircupy.engine.engine import Engine
    return Engine(smollm2_path, backend="numpy", n_ctx=N_CTX)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, MODEL)
    with ServerThread(app) as url:
        yield url, app.state.server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_for(cond, timeout=60.0):
    """Poll until cond() holds; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# ---- generation -----------------------------------------------------------------------------------

def test_models_and_health(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_chat_matches_the_engine_and_streams_the_same_text(client, engine):
    from aircupy.engine.params import SamplingParams
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    want = engine.generate(HELLO, SamplingParams(max_tokens=8, temperature=0))
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert c.message.role == "assistant" and c.message.content == want.text and want.text
    assert c.finish_reason == want.finish_reason and c.finish_reason in ("stop", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))

    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert all(ch.usage is None for ch in chunks[:-1]) and len({ch.id for ch in chunks}) == 1


def test_usage_counts_the_end_token_that_sends_no_text(client, engine):
    """completion_tokens counts every generated token, the end-of-generation one included, which sends
    no text (so a stream that ends that way has one content chunk fewer); streamed and whole answers
    and the engine agree on it."""
    from aircupy.engine.params import SamplingParams
    want = engine.generate(HELLO, SamplingParams(max_tokens=40, temperature=0))
    assert want.finish_reason == "stop" and want.token_ids[-1] in engine.tokenizer.eog_ids
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    n = len(want.token_ids)
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == n
    assert len(content) == n - 1 and "".join(c.choices[0].delta.content for c in content) == want.text
    last = chunks[-2].choices[0]
    assert last.finish_reason == "stop" and not last.delta.content


def test_completions_prompt_lists_n_and_token_ids(client, server):
    url, _ = server
    r = client.completions.create(model=MODEL, prompt=["The sky is", "Two plus two is"], n=2, max_tokens=3,
                                  temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    assert r.choices[0].text != r.choices[2].text
    ids = httpx.post(url + "/tokenize", json={"content": "The sky is"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    # each prompt counted once, each choice's tokens counted
    assert r.usage.completion_tokens == 12 and by_ids.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_logprobs_in_openai_formats(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy: top-1
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


def test_sampling_parameters_are_honoured(client, engine):
    prompt = "Once upon a time"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=1.0, top_p=0.9, presence_penalty=0.5,
              frequency_penalty=0.5, seed=1234, user="tester",
              extra_body={"repetition_penalty": 1.1, "top_k": 40, "min_p": 0.05})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text                          # seeded: reproducible

    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    tokens = greedy.choices[0].logprobs.tokens
    stop = tokens[2]                                  # a stop string that greedy decoding reaches
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert greedy.choices[0].text.startswith(cut.choices[0].text)

    from aircupy.engine.params import SamplingParams
    banned = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0)).token_ids[0]  # greedy's pick
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(banned): -100}, logprobs=0)
    assert biased.choices[0].logprobs.tokens[0] != tokens[0]


def test_concurrent_requests_overlap_and_a_disconnect_frees_blocks(server, engine):
    """A short request sent while a long stream runs finishes first: the engine batches them (one at a
    time, it would wait for all 100 tokens of the long one). Dropping the long stream then frees every
    KV block it held."""
    url, state = server

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        long = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
        it = long.__aiter__()
        first = await it.__anext__()                       # the long one has its first token
        short = await client.completions.create(model=MODEL, prompt="The sky is", max_tokens=2, temperature=0)
        during = engine.stats()
        more = await it.__anext__()                        # ... and is still streaming
        await long.close()
        await client.close()
        return first, short, during, more

    first, short, during, more = asyncio.run(main())
    assert first.choices[0].finish_reason is None and more.choices[0].finish_reason is None
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    assert during["running"] >= 1 and during["kv_blocks_used"] > 0     # the long one, mid-stream
    wait_for(lambda: engine.stats()["running"] == 0)
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and st["waiting"] == 0 and not state.generations
    assert st["cancelled_requests"] >= 1


def test_n_choices_share_the_prompt_blocks(client, engine):
    prompt = ("Here is a list of the eight planets of the solar system, in order from the sun outwards, "
              "with one short fact about each of them, what it is made of, how many moons it has, how long "
              "its year lasts and how far it is from the sun:")
    n_prompt = len(engine.prompt_ids(prompt))
    assert n_prompt > 2 * 16
    before = engine.stats()
    r = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=2, temperature=0)
    after = engine.stats()
    assert len({c.text for c in r.choices}) == 1 and r.usage.completion_tokens == 6
    # the three choices ran as three sequences; at least the 2nd and 3rd took the prompt's full blocks
    assert after["requests"] - before["requests"] == 3
    assert after["prompt_cached_tokens"] - before["prompt_cached_tokens"] >= 2 * ((n_prompt - 1) // 16) * 16


def test_cancel_mid_stream_frees_the_engine(server, client, engine):
    url, state = server
    before = metric(url, "aircupy_generation_tokens_total")
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert r.choices[0].text
    # the cancelled stream stopped early: far fewer than its 200 tokens were generated in all
    wait_for(lambda: engine.stats()["running"] == 0)
    assert metric(url, "aircupy_generation_tokens_total") - before < 50
    assert engine.stats()["kv_blocks_used"] == 0 and not state.generations


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param, code", [
    (dict(messages=[]), "messages", "invalid_value"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_value"),
    (dict(messages=HELLO, temperature=3), "temperature", "invalid_value"),
    (dict(messages=HELLO, top_p=0.0), "top_p", "invalid_value"),
    (dict(messages=HELLO, max_tokens=0), "max_tokens", "invalid_value"),
    (dict(messages=HELLO, n=100), "n", "invalid_value"),
    (dict(messages=HELLO, logit_bias={"999999": 1}), "logit_bias", "invalid_value"),
    (dict(messages=HELLO, extra_body={"top_k": "many"}), "top_k", "invalid_type"),
    (dict(messages=[{"role": "user", "content": "word " * 400}]), "messages", "context_length_exceeded"),
])
def test_bad_requests_are_400_with_param_and_code(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, **{"max_tokens": 2, **kwargs})
    e = ei.value
    assert e.status_code == 400 and e.code == code and e.param == param and e.type == "invalid_request_error"


def test_completion_errors(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    assert ei.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert ei.value.status_code == 404 and ei.value.code == "model_not_found" and ei.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("method, path, content, status, code", [
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/v1/completions", b"\xff\xfe\x00", 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "lots"}', 400, "invalid_type"),
    ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("POST", "/v1/models", b"{}", 405, "method_not_allowed"),
    ("GET", "/v2/anything", None, 404, "not_found"),
    ("POST", "/detokenize", b'{"tokens": [-1]}', 400, "invalid_value"),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}', 400, "invalid_value"),
    ("POST", "/tokenize", b'{"content": "\\udfff"}', 400, "invalid_value"),
])
def test_raw_http_errors(server, method, path, content, status, code):
    r = httpx.request(method, server[0] + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"} and err["message"]


def test_auth_and_body_limit_on_the_real_engine(engine):
    app = create_app(engine, MODEL, api_key="k3y", max_body=2048)
    with ServerThread(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0).choices
        with pytest.raises(openai.APIStatusError) as ei:
            good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 4000}],
                                         max_tokens=2)
        assert ei.value.status_code == 413
        payload = json.dumps({"model": MODEL, "prompt": "y" * 4000}).encode()
        chunked = httpx.post(url + "/v1/completions", content=iter([payload[:1000], payload[1000:]]),
                             headers={"Authorization": "Bearer k3y"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("template, says", [
    ("{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}", "'__init__' of 'type' object is unsafe"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'list' object is unsafe"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "must alternate"),
])
def test_hostile_or_failing_chat_template_is_a_clear_400_and_runs_nothing(client, engine, tmp_path, template,
                                                                          says):
    from aircupy.gguf.chat_template import ChatTemplate
    marker = tmp_path / "pwned"
    template = template.replace("MARKER", str(marker))
    original = engine.chat_template
    engine.chat_template = ChatTemplate.from_metadata({"tokenizer.chat_template": template}, engine.tokenizer)
    try:
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    finally:
        engine.chat_template = original
    assert ei.value.code == "template_error" and ei.value.param == "messages"
    assert says in ei.value.message and not marker.exists()


# ---- tokenize, metrics, logs ----------------------------------------------------------------------

def test_tokenize_detokenize(server, engine):
    url, _ = server
    r = httpx.post(url + "/tokenize", json={"content": "Hello world", "with_pieces": True}).json()
    ids = [t["id"] for t in r["tokens"]]
    assert ids == engine.prompt_ids("Hello world") and r["max_model_len"] == N_CTX
    plain = httpx.post(url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert plain["count"] == len(plain["tokens"]) and engine.detokenize(plain["tokens"]) == "Hello world"
    back = httpx.post(url + "/detokenize", json={"tokens": plain["tokens"]}).json()
    assert back["content"] == "Hello world" == back["prompt"]
    chat = httpx.post(url + "/tokenize", json={"messages": HELLO}).json()
    assert chat["tokens"] == engine.prompt_ids(HELLO)


def test_metrics_and_one_log_line_per_request(server, client, caplog):
    url, _ = server
    with caplog.at_level(logging.INFO, logger="aircupy.server"):
        r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
        httpx.get(url + "/v2/nothing")
        deadline = time.monotonic() + 5
        while len([x for x in caplog.messages if "/v2/nothing" in x]) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [m for m in caplog.messages if m.startswith(("POST /v1/completions", "GET /v2/nothing"))]
    want = f"POST /v1/completions 200 {r.usage.prompt_tokens}+{r.usage.completion_tokens} tokens"
    assert any(m.startswith(want) for m in lines) and any(m.startswith("GET /v2/nothing 404") for m in lines)
    text = httpx.get(url + "/metrics").text
    assert 'aircupy_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'aircupy_requests_total{endpoint="other",status="404"}' in text
    assert metric(url, "aircupy_generation_tokens_total") > 0 and metric(url, "aircupy_prompt_tokens_total") > 0
    assert metric(url, "aircupy_queue_depth") == 0
    assert metric(url, "aircupy_engine_completion_tokens") > 0        # the engine's own stats(), passed on
    # the batching gauges under their own names
    assert metric(url, "aircupy_running_sequences") == 0 and metric(url, "aircupy_waiting_sequences") == 0
    assert metric(url, "aircupy_kv_blocks_used") == 0 and metric(url, "aircupy_kv_blocks_free") > 0
    assert 0 <= metric(url, "aircupy_prefix_cache_hit_rate") <= 1 and metric(url, "aircupy_preemptions_total") >= 0


def test_cli_serve_binds_loopback_and_logs_each_request(smollm2_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "aircupy", "serve", "--model", str(smollm2_path), "--port", str(port),
           "--backend", "numpy", "--n-ctx", "128", "--model-name", "tiny", "--api-key", "k"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "AIRCUPY_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                                      "temperature": 0}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130) and "Traceback" not in err   # 130: the conventional exit after Ctrl-C
    assert f"serving tiny (numpy backend, n_ctx 128) at http://127.0.0.1:{port}/v1" in err
    assert "API key required" in err and "POST /v1/completions 200" in err and "+2 tokens" in err
