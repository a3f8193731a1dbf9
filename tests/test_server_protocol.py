"""Unit tests of the server's pure parts: request validation, OpenAI response shapes, metrics text."""
from __future__ import annotations

import json

import pytest

from aircupy.engine.results import TokenLogprob
from aircupy.errors import ContextLengthError, InvalidParameterError, TemplateError
from aircupy.server import responses as R
from aircupy.server.metrics import Metrics
from aircupy.server.protocol import (APIError, from_exception, parse_chat, parse_completion, parse_json)

USER = [{"role": "user", "content": "hi"}]


def err(fn, body) -> APIError:
    with pytest.raises(APIError) as ei:
        fn(body)
    return ei.value


# ---- request validation -------------------------------------------------------------------------

def test_chat_minimal_and_content_parts():
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert req.kind == "chat" and req.model == "m" and req.n == 1 and not req.stream
    assert req.prompts == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                            {"role": "assistant", "content": ""}]]
    assert "max_tokens" not in req.sampling and req.logprobs is None and req.sampling["stop"] == []


def test_chat_sampling_fields_map_to_sampling_params_names():
    req = parse_chat({"messages": USER, "temperature": 0, "top_p": 0.5, "top_k": -1, "min_p": 0.1,
                      "repetition_penalty": 1.1, "presence_penalty": 1, "frequency_penalty": -1.5,
                      "stop": "x", "seed": 7, "n": 3, "logit_bias": {"5": -100, "12": 2.5},
                      "max_tokens": 9, "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3,
                      "stream": True, "stream_options": {"include_usage": True}, "user": "u1"})
    s = req.sampling
    assert s["temperature"] == 0.0 and s["top_p"] == 0.5 and s["top_k"] == 0 and s["min_p"] == 0.1
    assert s["repeat_penalty"] == 1.1 and s["presence_penalty"] == 1.0 and s["frequency_penalty"] == -1.5
    assert s["stop"] == ["x"] and s["logit_bias"] == {5: -100.0, 12: 2.5}
    assert s["max_tokens"] == 4           # max_completion_tokens wins over max_tokens
    assert req.logprobs == 3 and req.n == 3 and req.stream and req.include_usage and req.user == "u1"
    assert [req.seed_for(i) for i in range(3)] == [7, 8, 9]
    assert parse_chat({"messages": USER, "seed": -1}).seed_for(0) is None   # llama.cpp's "random"


def test_chat_logprobs_without_top():
    assert parse_chat({"messages": USER, "logprobs": True}).logprobs == 0
    assert parse_chat({"messages": USER, "logprobs": False}).logprobs is None


@pytest.mark.parametrize("body, param, code", [
    ({}, "messages", "missing_required_parameter"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ({"messages": USER, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": USER, "temperature": 2.5}, "temperature", "invalid_value"),
    ({"messages": USER, "temperature": True}, "temperature", "invalid_type"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ({"messages": USER, "n": 0}, "n", "invalid_value"),
    ({"messages": USER, "n": 1000}, "n", "invalid_value"),
    ({"messages": USER, "presence_penalty": -3}, "presence_penalty", "invalid_value"),
    ({"messages": USER, "stop": ["a", 3]}, "stop", "invalid_type"),
    ({"messages": USER, "stop": [""]}, "stop", "invalid_value"),
    ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
    ({"messages": USER, "logit_bias": {"3": 101}}, "logit_bias", "invalid_value"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "invalid_type"),
    ({"messages": USER, "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": USER, "model": 3}, "model", "invalid_type"),
    ({"messages": USER, "seed": -5}, "seed", "invalid_value"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions", "invalid_value"),
])
def test_chat_rejects(body, param, code):
    e = err(parse_chat, body)
    assert (e.status, e.param, e.code, e.type) == (400, param, code, "invalid_request_error")
    assert param.split("[")[0] in e.message


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "a"}).prompts == ["a"]
    assert parse_completion({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert parse_completion({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    req = parse_completion({"prompt": "a", "logprobs": 2})
    assert req.logprobs == 2 and req.sampling["max_tokens"] == 16   # the legacy endpoint's default
    assert parse_completion({"prompt": "a", "best_of": 2, "n": 2}).n == 2


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": ["a", 1]}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": [True]}, "prompt"), ({"prompt": "a", "logprobs": 50}, "logprobs"),
    ({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "best_of": 3}, "best_of"),
])
def test_completion_rejects(body, param):
    e = err(parse_completion, body)
    assert e.status == 400 and e.param == param


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b"", b'"text"', b'{"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}"])
def test_parse_json_rejects_non_objects(raw):
    e = err(parse_json, raw)
    assert e.status == 400 and e.code == "invalid_json"


def test_lone_surrogates_are_a_400_not_a_tokenizer_crash():
    for raw in (b'{"prompt": "hi\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                b'{"logit_bias": {"\\ud800": 1}}', b'{"prompt": "\xed\xa0\x80"}'):
        e = err(parse_json, raw)
        assert e.status == 400 and e.param in ("prompt", "messages", "logit_bias") and "surrogate" in e.message
    assert parse_json('{"prompt": "\\ud83d\\ude00"}'.encode())["prompt"] == "\U0001F600"  # a valid pair


def test_exceptions_map_to_client_errors_never_5xx():
    assert from_exception(ContextLengthError("too long")).code == "context_length_exceeded"
    e = from_exception(InvalidParameterError("top_p", "must be in (0, 1]"))
    assert (e.status, e.param) == (400, "top_p")
    assert from_exception(TemplateError("forbidden attribute")).status == 400
    bug = from_exception(KeyError("x"))
    assert (bug.status, bug.type) == (500, "server_error")
    assert set(bug.body()["error"]) == {"message", "type", "param", "code"}


# ---- response shapes ------------------------------------------------------------------------------

LPS = [TokenLogprob(5, "Hi", -0.1, ((5, "Hi", -0.1), (6, "Hey", -2.5))),
       TokenLogprob(7, "é", -0.7, ((7, "é", -0.7),))]


def test_chat_response_shape():
    body = R.completion_response("chat", "chatcmpl-1", 123, "m", [R.ChoiceResult(0, "Hié", "stop", LPS)],
                                 10, 2, with_logprobs=True)
    assert body["object"] == "chat.completion" and body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2,
                                                                       "total_tokens": 12}
    ch = body["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": "Hié"} and ch["finish_reason"] == "stop"
    c0, c1 = ch["logprobs"]["content"]
    assert c0 == {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                  "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                                   {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}]}
    assert c1["bytes"] == [0xC3, 0xA9]


def test_completion_response_legacy_logprobs_and_order():
    choices = [R.ChoiceResult(1, "b", "length"), R.ChoiceResult(0, "Hié", "stop", LPS)]
    body = R.completion_response("completion", "cmpl-1", 1, "m", choices, 3, 4, with_logprobs=True)
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    lp = body["choices"][0]["logprobs"]
    assert lp == {"tokens": ["Hi", "é"], "token_logprobs": [-0.1, -0.7],
                  "top_logprobs": [{"Hi": -0.1, "Hey": -2.5}, {"é": -0.7}], "text_offset": [0, 2]}
    assert R.completion_response("completion", "x", 1, "m", choices, 3, 4, False)["choices"][0]["logprobs"] is None


def test_chunks_and_sse():
    c = R.chunk("chat", "id", 1, "m", 0, role=True, text="", include_usage=True)
    assert c["choices"][0]["delta"] == {"role": "assistant", "content": ""} and c["usage"] is None
    fin = R.chunk("chat", "id", 1, "m", 2, finish="length")
    assert fin["choices"][0] == {"index": 2, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert "usage" not in fin
    t = R.chunk("completion", "id", 1, "m", 0, text="x", logprobs=LPS[:1], text_offset=4)
    assert t["object"] == "text_completion" and t["choices"][0]["logprobs"]["text_offset"] == [4]
    u = R.usage_chunk("chat", "id", 1, "m", 3, 5)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 8
    raw = R.sse(c)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and json.loads(raw[6:]) == c
    assert R.sse("[DONE]") == b"data: [DONE]\n\n"
    assert R.finish_reason("length") == "length" and R.finish_reason("stop") == "stop"
    assert R.new_id("chat").startswith("chatcmpl-") and R.new_id("completion").startswith("cmpl-")


# ---- metrics ------------------------------------------------------------------------------------

def test_metrics_text_format_and_engine_stats():
    m = Metrics()
    m.on_request("/v1/completions", 200, 0.5)
    m.on_request("/v1/completions", 400, 0.01)
    m.on_tokens(20)
    m.on_finished(7, 20, 2.0)
    text = m.render(3, lambda: {"h2d_gb_s": 52.5, "layers": {"resident": 10}, "name": "skip", "stalled": True})
    lines = text.splitlines()
    assert 'aircupy_requests_total{endpoint="/v1/completions",status="200"} 1' in lines
    assert 'aircupy_requests_total{endpoint="/v1/completions",status="400"} 1' in lines
    assert "aircupy_prompt_tokens_total 7" in lines and "aircupy_generation_tokens_total 20" in lines
    assert 'aircupy_tokens_per_second{window="last"} 10.000' in lines and "aircupy_queue_depth 3" in lines
    assert "aircupy_engine_h2d_gb_s 52.5" in lines and "aircupy_engine_layers_resident 10" in lines
    assert "aircupy_engine_stalled 1" in lines and not any("skip" in x for x in lines)
    for line in lines:  # every sample line is `name{labels} value` with a float value
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert "aircupy_engine" not in m.render(0, None)

    def broken():
        raise RuntimeError("no stats yet")
    assert "engine stats unavailable" in m.render(0, broken)
