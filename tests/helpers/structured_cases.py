"""Real-world shaped JSON schemas and GBNF grammars for the structured-output tests.

SCHEMAS: (name, schema) pairs covering nested objects, arrays, enums, anyOf/oneOf, $ref/$defs, formats,
string patterns, numeric and length bounds, const, nullable fields. Strings and arrays carry length
bounds, as production schemas for extraction do, so a 135M model finishes them in a few dozen tokens.
Every object schema is closed (additionalProperties false), as OpenAI's strict mode requires: an open
object lets a base model add keys until max_tokens (a valid prefix, never a finished value).
GRAMMARS: (name, GBNF, full-match regex) triples; the regex is the test's independent check.
"""
from __future__ import annotations

S = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS = [
    ("person", {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"], "additionalProperties": False}),
    ("weather_call", {"type": "object", "properties": {"location": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["location", "unit"]}),
    ("sentiment", {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                                    "score": {"type": "number", "minimum": 0, "maximum": 1}},
                   "required": ["label", "score"]}),
    ("boolean_flag", {"type": "object", "properties": {"is_spam": {"type": "boolean"}}, "required": ["is_spam"]}),
    ("tags", {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
              "required": ["tags"]}),
    ("address", {"type": "object", "properties": {
        "street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "FR", "DE"]}}, "required": ["city", "zip", "country"]}),
    ("nested_order", {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "customer": {"type": "object", "properties": {"name": S, "vip": {"type": "boolean"}}, "required": ["name", "vip"]},
        "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}}, "required": ["id", "customer", "items"]}),
    ("any_of_id", {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                                                      {"type": "string", "pattern": "^[a-z]{2,6}$"}]}},
                   "required": ["id"]}),
    ("nullable", {"type": "object", "properties": {"nickname": {"type": ["string", "null"], "maxLength": 10},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 99}},
                  "required": ["nickname", "age"]}),
    ("email_date", {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 30},
                                                     "date": {"type": "string", "format": "date"}},
                    "required": ["email", "date"]}),
    ("uuid", {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]}),
    ("const_version", {"type": "object", "properties": {"version": {"const": "1.0"}, "ok": {"type": "boolean"}},
                       "required": ["version", "ok"]}),
    ("defs_ref", {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                                       "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                                      "required": ["x", "y"]}},
                  "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
                  "required": ["a", "b"]}),
    ("one_of_shape", {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["kind", "side"], "additionalProperties": False}]}}, "required": ["shape"]}),
    ("int_array", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 4}),
    ("string_enum_top", {"enum": ["red", "green", "blue"]}),
    ("number_bounds", {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                                                        "discount": {"type": "number", "minimum": 0, "maximum": 0.5}},
                       "required": ["price", "discount"]}),
    ("phone_pattern", {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\+1-[0-9]{3}-[0-9]{4}$"}},
                       "required": ["phone"]}),
    ("calendar_event", {"type": "object", "properties": {
        "title": S, "start": {"type": "string", "format": "date-time"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
        "required": ["title", "start", "attendees"]}),
    ("classification", {"type": "object", "properties": {
        "category": {"enum": ["billing", "technical", "account", "other"]},
        "priority": {"type": "integer", "enum": [1, 2, 3]}, "escalate": {"type": "boolean"}},
        "required": ["category", "priority", "escalate"]}),
    ("matrix", {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}},
        "required": ["rows"]}),
    ("recipe", {"type": "object", "properties": {
        "name": S, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
            "item": S, "grams": {"type": "integer", "minimum": 1, "maximum": 999}}, "required": ["item", "grams"]}}},
        "required": ["name", "servings", "ingredients"]}),
    ("optional_only", {"type": "object", "properties": {"note": {"type": "string", "maxLength": 10}},
                       "additionalProperties": False}),
    ("unique_codes", {"type": "object", "properties": {"codes": {"type": "array", "items": {"enum": ["A", "B", "C"]},
                                                                 "maxItems": 3}}, "required": ["codes"]}),
    ("ip_host", {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"},
                                                  "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                 "required": ["ip", "port"]}),
    ("all_of", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
                          {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}),
    ("book", {"type": "object", "properties": {
        "title": S, "author": {"type": "object", "properties": {"first": S, "last": S}, "required": ["last"]},
        "year": {"type": "integer", "minimum": 1450, "maximum": 2030}, "isbn": {"type": "string", "pattern": "^[0-9]{13}$"}},
        "required": ["title", "author", "year"]}),
    ("multiple_of", {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
                     "required": ["n"]}),
    ("string_array_top", {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}),
    ("tool_args", {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 20}, "limit": {"type": "integer", "minimum": 1, "maximum": 10},
        "filters": {"type": "object", "properties": {"lang": {"enum": ["en", "fr"]}}, "required": ["lang"]}},
        "required": ["query", "limit", "filters"], "additionalProperties": False}),
    ("coordinates", {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"]}),
    ("deep_nesting", {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "object", "properties": {"d": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["d"]}},
        "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
]

def _closed(schema):
    """The schema with additionalProperties false on every object that does not say otherwise."""
    if isinstance(schema, dict):
        # allOf parts are left open: closed, each would forbid the other parts' keys.
        out = {k: (v if k == "allOf" else _closed(v)) for k, v in schema.items()}
        if "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


SCHEMAS = [(name, _closed(schema)) for name, schema in SCHEMAS]

GRAMMARS = [
    ("yes_no", 'root ::= "yes" | "no"', r"yes|no"),
    ("integer", 'root ::= "-"? [1-9] [0-9]{0,3}', r"-?[1-9][0-9]{0,3}"),
    ("date", 'root ::= [0-9]{4} "-" [0-1] [0-9] "-" [0-3] [0-9]', r"[0-9]{4}-[0-1][0-9]-[0-3][0-9]"),
    ("list3", 'root ::= item ", " item ", " item\nitem ::= [a-z]{1,8}', r"[a-z]{1,8}, [a-z]{1,8}, [a-z]{1,8}"),
    ("arith", 'root ::= num (" " op " " num){1,2}\nnum ::= [0-9]{1,3}\nop ::= "+" | "-" | "*"',
     r"[0-9]{1,3}( [+*-] [0-9]{1,3}){1,2}"),
    ("greeting", 'root ::= ("Hello" | "Hi") ", " name "!"\nname ::= [A-Z] [a-z]{1,8}', r"(Hello|Hi), [A-Z][a-z]{1,8}!"),
    ("kv_pairs", 'root ::= pair ("; " pair){0,2}\npair ::= [a-z]{1,6} "=" [0-9]{1,3}', r"[a-z]{1,6}=[0-9]{1,3}(; [a-z]{1,6}=[0-9]{1,3}){0,2}"),
    ("sql_select", 'root ::= "SELECT " col " FROM " tbl ";"\ncol ::= "*" | [a-z]{1,8}\ntbl ::= [a-z]{1,8}',
     r"SELECT (\*|[a-z]{1,8}) FROM [a-z]{1,8};"),
    ("color_hex", 'root ::= "#" [0-9a-f]{6}', r"#[0-9a-f]{6}"),
    ("tiny_json_array", 'root ::= "[" ws num (ws "," ws num){0,3} ws "]"\nnum ::= [0-9]{1,2}\nws ::= " "?',
     r"\[ ?[0-9]{1,2}( ?, ?[0-9]{1,2}){0,3} ?\]"),
]
