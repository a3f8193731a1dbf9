"""OpenAI request validation: JSON bodies -> GenerationRequest, or an APIError naming the parameter.

Pure functions, no model: what depends on the model (vocabulary size, context length, the tokenizer)
is checked in app.py once the prompt is tokenized. Ranges here are OpenAI's documented ones; ranges
the engine owns (top_p in (0, 1], repetition_penalty > 0, ...) are left to SamplingParams, whose
InvalidParameterError the app turns into the same 400. The response shapes live in responses.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from aircupy.server import structured, tools
from aircupy.server.apierror import APIError, bad, opt_bool, opt_str
from aircupy.server.limits import Limits

# Chat roles the templates understand; "developer" is OpenAI's newer name for "system"; "tool" answers
# an assistant's tool call (server/tools.py).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TOP_LOGPROBS = 20
DEFAULT_LIMITS = Limits()   # the caps on n, stop strings, logit_bias and prompts (server/limits.py)
# request key -> SamplingParams field (repetition_penalty is vLLM's name, repeat_penalty llama.cpp's)
_SAMPLING_FLOATS = {"temperature": "temperature", "top_p": "top_p", "min_p": "min_p",
                    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                    "repetition_penalty": "repeat_penalty", "repeat_penalty": "repeat_penalty"}
_RANGES = {"temperature": (0.0, 2.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
           "top_p": (0.0, 1.0), "min_p": (0.0, 1.0)}


@dataclass
class GenerationRequest:
    """One validated /v1/chat/completions or /v1/completions request.

    prompts: chat -> [messages] (one conversation, each message {"role", "content": str});
    completions -> list of prompts, each a str or a list of token ids (one choice group per prompt).
    sampling: keyword arguments for SamplingParams (aircupy.engine.params) for the fields the client
              set, without seed (per choice, see seed_for) and max_tokens when absent (the app fills it).
    logprobs: number of top alternatives per token, None when logprobs were not asked for.
    constraint_param: the request field an output constraint came from (structured.py), set with the
              constraint's SamplingParams field in `sampling`; errors compiling it name this field.
    tools:    chat only: the request's function tools and tool_choice (server/tools.py), or None;
              generation.prepare sets its convention from the model's chat template.
    """
    kind: str
    model: str | None
    prompts: list
    sampling: dict = field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    user: str | None = None
    constraint_param: str | None = None
    tools: tools.ToolRequest | None = None

    def seed_for(self, choice: int) -> int | None:
        """Choice i of n gets seed + i: reproducible per request, yet n different samples."""
        return None if self.seed is None else self.seed + choice


def _not_json(name: str):
    # Python's json module accepts NaN, Infinity and -Infinity; JSON (RFC 8259) has no such literals.
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes) -> dict:
    """Decode a request body; anything but a JSON object is a 400 (never a 500)."""
    return check_body(decode_json(raw))


def decode_json(raw: bytes | str) -> Any:
    """JSON text -> a value; malformed JSON, NaN and Infinity are a 400 (invalid_json). The batch runner
    decodes its input lines with it too (server/batch_file.py)."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "JSON body nested too deeply", code="invalid_json") from None


def check_body(body: Any) -> dict:
    """A decoded request body as the server takes it: a JSON object whose strings are valid Unicode."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        for key, value in body.items():
            _check_unicode(value, key)
    except RecursionError:
        raise APIError(400, "JSON body nested too deeply", code="invalid_json") from None
    return body


def _check_unicode(value: Any, param: str) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode: a 400 here,
    rather than a TypeError deep in the tokenizer (a 500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad(param, "contains an unpaired UTF-16 surrogate (not valid Unicode)") from None
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, param)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, param)
            _check_unicode(v, param)


# ---- typed field readers (also used by app.py): the value, None when absent/null, else a 400 ----

def opt_int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):  # bool is an int subclass: reject it explicitly
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(key, f"expected an integer, got {type(v).__name__}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(key, f"{v} is out of range [{lo if lo is not None else '-inf'}, "
                       f"{hi if hi is not None else 'inf'}]")
    return v


def opt_float(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(key, f"expected a number, got {type(v).__name__}", "invalid_type")
    try:
        v = float(v)   # an integer literal of 400 digits is valid JSON but too big for a float
    except OverflowError:
        raise bad(key, "must be a finite number") from None
    if not math.isfinite(v):   # 1e400 parses as inf
        raise bad(key, "must be a finite number")
    lo, hi = _RANGES.get(key, (None, None))
    if lo is not None and not lo <= v <= hi:
        raise bad(key, f"{v} is out of range [{lo}, {hi}]")
    return v


def _stop(body: dict, limits: Limits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "expected a string or a list of strings", "invalid_type")
    if len(v) > limits.max_stop:
        raise bad("stop", f"at most {limits.max_stop} stop sequences on this server, got {len(v)}")
    if any(s == "" for s in v):
        raise bad("stop", "stop sequences must not be empty")
    if any(len(s) > limits.max_stop_chars for s in v):
        raise bad("stop", f"a stop sequence may have at most {limits.max_stop_chars} characters")
    return v


def _logit_bias(body: dict, limits: Limits) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("logit_bias", "expected an object mapping token ids to biases", "invalid_type")
    if len(v) > limits.max_logit_bias:
        raise bad("logit_bias", f"at most {limits.max_logit_bias} entries on this server, got {len(v)}")
    out: dict[int, float] = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad("logit_bias", f"key {k!r} is not a token id") from None
        if tid < 0:
            raise bad("logit_bias", f"token id {tid} is negative")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad("logit_bias", f"bias for token {k} must be a number in [-100, 100]")
        out[tid] = float(b)
    return out


def _common(body: dict, kind: str, prompts: list, limits: Limits) -> GenerationRequest:
    """The parameters chat and completions share."""
    model = opt_str(body, "model")
    user = opt_str(body, "user")
    n = opt_int(body, "n", 1, limits.max_n) or 1
    stream = bool(opt_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", "expected an object", "invalid_type")
        if not stream:
            raise bad("stream_options", "only allowed when stream is true")
        include_usage = opts.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", "expected a boolean", "invalid_type")
        include_usage = bool(include_usage)
    sampling: dict[str, Any] = {}
    for key, name in _SAMPLING_FLOATS.items():
        v = opt_float(body, key)
        if v is not None:
            sampling[name] = v
    top_k = opt_int(body, "top_k", -1)
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)  # vLLM's -1 and llama.cpp's 0 both mean "no top-k"
    sampling["stop"] = _stop(body, limits)
    bias = _logit_bias(body, limits)
    if bias:
        sampling["logit_bias"] = bias
    ignore_eos = opt_bool(body, "ignore_eos")  # llama.cpp / vLLM extension, handy for benchmarks
    if ignore_eos:
        sampling["ignore_eos"] = True
    seed = opt_int(body, "seed", -1, 2**63 - 1)
    seed = None if seed == -1 else seed  # llama.cpp's -1: "a random seed"
    constraint = structured.parse(body)
    param = None
    if constraint is not None:
        field_name, value, param = constraint
        sampling[field_name] = value
    return GenerationRequest(kind, model, prompts, sampling, seed, n, stream, include_usage, user=user,
                             constraint_param=param)


def _reject_unsupported(body: dict) -> None:
    """Say so rather than silently ignore features that would change the answer."""
    for key in ("functions", "function_call"):   # OpenAI's deprecated form of tools
        if body.get(key) is not None:
            raise bad(key, "the deprecated functions API is not supported: use tools and tool_choice")


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    where = f"messages[{i}].content"
    if c is None:
        if msg.get("role") == "assistant":  # OpenAI allows null content on assistant turns
            return ""
        raise bad(where, "missing content", "missing_required_parameter")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad(f"{where}[{j}]", "expected a content part object", "invalid_type")
            if part["type"] != "text":
                raise bad(f"{where}[{j}].type", f"content part type {part['type']!r} is not supported "
                          "(text only)")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text", "expected a string", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, "expected a string or a list of text parts", "invalid_type")


def _message(m: dict, i: int, role: str) -> dict:
    """One chat message as the template receives it: role, string content, and the tool fields."""
    msg = {"role": ROLES[role], "content": _content(m, i)}
    if role == "assistant" and m.get("tool_calls") is not None:
        msg["tool_calls"] = tools.message_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
    if role == "tool":
        cid = m.get("tool_call_id")
        if not isinstance(cid, str):
            raise bad(f"messages[{i}].tool_call_id", "is required (the id of the call this answers)",
                      "missing_required_parameter" if cid is None else "invalid_type")
        msg["tool_call_id"] = cid
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
    return msg


def parse_chat(body: dict, limits: Limits = DEFAULT_LIMITS) -> GenerationRequest:
    """Validate a /v1/chat/completions body."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "is required", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise bad("messages", "expected a list of messages", "invalid_type")
    if not msgs:
        raise bad("messages", "must contain at least one message")
    norm = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "expected a message object", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"messages[{i}].role", f"unknown role {role!r} (expected one of "
                      f"{', '.join(sorted(ROLES))})")
        norm.append(_message(m, i, role))
    _reject_unsupported(body)
    req = _common(body, "chat", [norm], limits)
    req.tools = tools.parse(body)
    if req.tools is not None and req.tools.constrained and req.constraint_param is not None:
        raise bad("tool_choice", f"a required tool call cannot be combined with {req.constraint_param}")
    # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
    mt = opt_int(body, "max_completion_tokens", 1)
    mt = mt if mt is not None else opt_int(body, "max_tokens", 1)
    if mt is not None:
        req.sampling["max_tokens"] = mt
    want = opt_bool(body, "logprobs")
    top = opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "requires logprobs to be true")
    req.logprobs = (top or 0) if want else None
    return req


def _prompt_list(p: Any) -> list:
    """prompt: str | list[str] | list[int] | list[list[int]] -> list of (str | list[int])."""
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in p):
            return [list(x) for x in p]
    if isinstance(p, list) and not p:
        raise bad("prompt", "must not be empty")
    raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists",
              "invalid_type")


def parse_completion(body: dict, limits: Limits = DEFAULT_LIMITS) -> GenerationRequest:
    """Validate a /v1/completions body."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "is required", "missing_required_parameter")
    prompts = _prompt_list(body["prompt"])
    if len(prompts) > limits.max_prompts:
        raise bad("prompt", f"at most {limits.max_prompts} prompts in one request on this server, "
                            f"got {len(prompts)}")
    if opt_bool(body, "echo"):
        raise bad("echo", "echo is not supported")
    if body.get("suffix"):
        raise bad("suffix", "suffix is not supported")
    req = _common(body, "completion", prompts, limits)
    best_of = opt_int(body, "best_of", 1)
    if best_of is not None and best_of != req.n:
        raise bad("best_of", "best_of other than n is not supported")
    mt = opt_int(body, "max_tokens", 1)
    req.sampling["max_tokens"] = 16 if mt is None else mt  # the legacy endpoint's documented default
    req.logprobs = opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return req


def check_model(model: str | None, served: str) -> None:
    """An absent model means "the one this server serves" (curl users); a wrong one is a 404 as at OpenAI."""
    if model is not None and model != served:
        raise APIError(404, f"The model {model!r} does not exist (this server serves {served!r})",
                       param="model", code="model_not_found")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids from the client (prompt lists, logit_bias keys, /detokenize) must be in the vocabulary."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise bad(param, f"token id {t} is outside the vocabulary [0, {vocab_size})")


def from_exception(e: BaseException) -> APIError:
    """Map what prepare()/the engine raised to the error the client sees.

    Errors caused by input (AircupyError) are 400s, never 5xx: OpenAI's client retries every 5xx, and a
    retry of a bad request can only fail again. Anything else is a bug in the server: a 500.
    """
    from aircupy.errors import AircupyError, ContextLengthError, InvalidParameterError, TemplateError

    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return APIError(400, str(e), param=e.param, code="invalid_value")
    if isinstance(e, TemplateError):
        return APIError(400, f"chat template failed: {e}", param="messages", code="template_error")
    if isinstance(e, AircupyError):
        return APIError(400, str(e), code="invalid_request")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
