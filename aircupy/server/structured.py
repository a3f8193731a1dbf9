"""Structured-output request fields -> one SamplingParams constraint, in every dialect clients send.

  OpenAI     response_format {"type": "text" | "json_object" | "json_schema",
                              "json_schema": {"name", "schema", "strict", "description"}}
  llama.cpp  grammar (GBNF), json_schema (a schema object), response_format {"type": "json_object",
             "schema": {...}} (its older form of a schema)
  vLLM       structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object"} and the older
             guided_json / guided_regex / guided_choice / guided_grammar

Pure shape checks here (no llguidance): parse() returns (kind, value, param) where kind is the
SamplingParams field and param the request field it came from, so that a schema that does not compile
(found when generation.prepare builds SamplingParams) is a 400 naming what the client sent.
"""
from __future__ import annotations

from typing import Any

from aircupy.server.apierror import bad, opt_bool, opt_str

# vLLM's structured_outputs keys and the older guided_* fields -> SamplingParams field
_VLLM = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def parse(body: dict) -> tuple[str, Any, str] | None:
    """The one constraint `body` asks for, or None; a 400 for a malformed field or for two of them."""
    found: list[tuple[str, Any, str]] = []
    rf = body.get("response_format")
    if rf is not None:
        c = _response_format(rf)
        if c is not None:
            found.append(c)
    if body.get("grammar") is not None:
        found.append(("grammar", _string(body, "grammar"), "grammar"))
    if body.get("json_schema") is not None:
        found.append(("json_schema", _schema(body["json_schema"], "json_schema"), "json_schema"))
    so = body.get("structured_outputs")
    if so is not None:
        found.extend(_structured_outputs(so))
    for key, kind in _GUIDED.items():
        if body.get(key) is not None:
            found.append((kind, _value(kind, body[key], key), key))
    if len(found) > 1:
        raise bad(found[1][2], f"only one output constraint per request, got {', '.join(f[2] for f in found)}")
    return found[0] if found else None


def _response_format(rf) -> tuple[str, Any, str] | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("response_format", "expected an object with a string `type`", "invalid_type")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        if rf.get("schema") is not None:   # llama.cpp's form of a schema
            return "json_schema", _schema(rf["schema"], "response_format.schema"), "response_format.schema"
        return "json_object", True, "response_format"
    if kind == "json_schema":
        js = rf.get("json_schema")
        param = "response_format.json_schema"
        if not isinstance(js, dict):
            raise bad(param, "expected an object {name, schema, strict}", "invalid_type")
        opt_str(js, "name", f"{param}.name")
        opt_bool(js, "strict", f"{param}.strict")
        if js.get("schema") is None:
            raise bad(f"{param}.schema", "is required", "missing_required_parameter")
        return "json_schema", _schema(js["schema"], f"{param}.schema"), f"{param}.schema"
    raise bad("response_format.type", f"unknown type {kind!r} (expected text, json_object or json_schema)")


def _structured_outputs(so) -> list[tuple[str, Any, str]]:
    if not isinstance(so, dict):
        raise bad("structured_outputs", "expected an object", "invalid_type")
    out = []
    for key, v in so.items():
        param = f"structured_outputs.{key}"
        if v is None:
            continue
        if key in _VLLM:
            out.append((_VLLM[key], _value(_VLLM[key], v, param), param))
        elif key == "json_object":
            if v is not True:
                raise bad(param, "expected true", "invalid_type")
            out.append(("json_object", True, param))
        else:   # vLLM's other options (backend, whitespace_pattern, ...) would change the answer silently
            raise bad(param, "is not supported (json, regex, choice, grammar or json_object)")
    return out


def _value(kind: str, v, param: str):
    if kind == "json_schema":
        return _schema(v, param)
    if kind == "choice":
        if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
            raise bad(param, "expected a non-empty list of strings", "invalid_type")
        return v
    if not isinstance(v, str) or not v:
        raise bad(param, "expected a non-empty string", "invalid_type")
    return v


def _string(body: dict, key: str) -> str:
    return _value("grammar", body[key], key)


def _schema(v, param: str):
    """A schema object, or JSON text of one (vLLM's guided_json accepts both)."""
    if isinstance(v, (dict, str, bool)):
        return v
    raise bad(param, "expected a JSON schema object", "invalid_type")
