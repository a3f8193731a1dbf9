"""Structured output over HTTP: every request shape (OpenAI response_format, llama.cpp grammar and
json_schema, vLLM structured_outputs and guided_*) parsed to its one constraint, every malformed or
uncompilable one a 400 naming the field; and end to end on the real SmolLM2 with the `openai` client."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from aircupy.server.app import create_app
from aircupy.server.protocol import APIError, parse_chat, parse_completion
from aircupy.server.runner import ServerThread
from tests.helpers.engines import numpy_engine

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("extra, kind, value, param", [
    ({"response_format": {"type": "text"}}, None, None, None),
    ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, "json_schema", SCHEMA,
     "response_format.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
     "json_schema", SCHEMA, "response_format.json_schema.schema"),
    ({"grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "grammar"),
    ({"json_schema": SCHEMA}, "json_schema", SCHEMA, "json_schema"),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "[ab]+"}}, "regex", "[ab]+", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["x", "y"]}}, "choice", ["x", "y"], "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: /[0-9]+/"}}, "grammar", "start: /[0-9]+/",
     "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": True}}, "json_object", True, "structured_outputs.json_object"),
    ({"guided_json": json.dumps(SCHEMA)}, "json_schema", json.dumps(SCHEMA), "guided_json"),
    ({"guided_regex": "a+"}, "regex", "a+", "guided_regex"),
    ({"guided_choice": ["x"]}, "choice", ["x"], "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar"),
])
def test_every_request_shape_maps_to_one_constraint(extra, kind, value, param):
    for parse, base in ((parse_chat, {"messages": USER}), (parse_completion, {"prompt": "hi"})):
        req = parse({**base, **extra})
        assert req.constraint_param == param
        if kind is None:
            assert not set(req.sampling) & {"grammar", "json_schema", "regex", "choice", "json_object"}
        else:
            assert req.sampling[kind] == value


@pytest.mark.parametrize("extra, param", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"grammar": 3}, "grammar"),
    ({"grammar": ""}, "grammar"),
    ({"structured_outputs": []}, "structured_outputs"),
    ({"structured_outputs": {"choice": "x"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_regex": ["a"]}, "guided_regex"),
    ({"grammar": 'root ::= "a"', "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "json_schema": SCHEMA}, "json_schema"),
])
def test_malformed_constraints_are_400_naming_the_field(extra, param):
    with pytest.raises(APIError) as ei:
        parse_chat({"messages": USER, **extra})
    assert (ei.value.status, ei.value.param) == (400, param)


# ---- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_path):
    app = create_app(numpy_engine(smollm2_path), "smollm2")
    with ServerThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Describe a person named Bob who is 42, as JSON."}]


def test_openai_json_schema_response_format(client):
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"


def test_json_object_streams_and_parses(client):
    ask = [{"role": "user", "content": "Give me a JSON object describing a person named Alice, age 30."}]
    stream = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=24, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_vllm_choice_and_llama_cpp_grammar_on_completions(client):
    r = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                  extra_body={"guided_choice": [" yes", " no"]})
    assert r.choices[0].text in (" yes", " no")
    r = client.completions.create(model="smollm2", prompt="Count: 1, 2,", max_tokens=8, temperature=0,
                                  extra_body={"grammar": 'root ::= " " [0-9] ", " [0-9]'})
    t = r.choices[0].text
    assert len(t) == 5 and t[1].isdigit() and t[2:4] == ", " and t[4].isdigit()


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "json_schema"),
])
def test_constraints_that_do_not_compile_are_400_with_param(server, extra, param):
    r = httpx.post(server + "/v1/chat/completions", timeout=60,
                   json={"model": "smollm2", "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
